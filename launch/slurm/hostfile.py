"""From a SLURM allocation to a launch command: expand SLURM_JOB_NODELIST, write a DeepSpeed hostfile, and
build the deepspeed-launcher or torchrun (c10d rendezvous) command for launch/train.py.

    python -m launch.slurm.hostfile --launcher torchrun -- --recipe llama_selora deepspeed.config=zero3
prints the command for this node (train.sbatch runs it on every node through srun).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


class SlurmEnvError(ValueError):
    """A SLURM variable is missing or malformed; the message names it and the fix."""


def _expand_range(prefix: str, body: str, suffix: str) -> list[str]:
    hosts = []
    for part in body.split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
                raise SlurmEnvError(f"SLURM_JOB_NODELIST range {part!r} is malformed (expected e.g. 01-04)")
            width = len(low)
            hosts += [f"{prefix}{n:0{width}d}{suffix}" for n in range(int(low), int(high) + 1)]
        elif part.isdigit():
            hosts.append(f"{prefix}{part}{suffix}")
        else:
            raise SlurmEnvError(f"SLURM_JOB_NODELIST element {part!r} is malformed")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,07],login5' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login5'] (zero padding kept)."""
    if not nodelist or not nodelist.strip():
        raise SlurmEnvError("SLURM_JOB_NODELIST is empty; run inside an allocation (sbatch/salloc)")
    hosts, depth, start = [], 0, 0
    items = []
    for index, char in enumerate(nodelist):  # split on commas outside brackets
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise SlurmEnvError(f"SLURM_JOB_NODELIST={nodelist!r} has an unmatched ']'")
        elif char == "," and depth == 0:
            items.append(nodelist[start:index])
            start = index + 1
    if depth != 0:
        raise SlurmEnvError(f"SLURM_JOB_NODELIST={nodelist!r} has an unmatched '['")
    items.append(nodelist[start:])
    for item in items:
        match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", item)
        if match:
            hosts += _expand_range(*match.groups())
        elif item and "[" not in item and "]" not in item:
            hosts.append(item)
        else:
            raise SlurmEnvError(f"SLURM_JOB_NODELIST element {item!r} is malformed")
    return hosts


def hostnames(env: dict) -> list[str]:
    """Nodes of the allocation: `scontrol show hostnames` where SLURM is installed, else our own parser."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist is None:
        raise SlurmEnvError("SLURM_JOB_NODELIST is not set; run inside an allocation (sbatch/salloc)")
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_nodelist(nodelist)


def gpus_per_node(env: dict) -> int:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key)
        if value:
            count = value.split(":")[-1].split("(")[0]  # "4", "h100:4", "4(x2)"
            if count.isdigit() and int(count) > 0:
                return int(count)
            raise SlurmEnvError(f"{key}={value!r} is not a GPU count; request GPUs with --gpus-per-node=N")
    raise SlurmEnvError("neither SLURM_GPUS_ON_NODE nor SLURM_GPUS_PER_NODE is set; request GPUs with "
                        "#SBATCH --gpus-per-node=N (or pass --gpus-per-node)")


def write_hostfile(hosts: list[str], slots: int, path: Path) -> Path:
    path.write_text("".join(f"{host} slots={slots}\n" for host in hosts))
    return path


def deepspeed_command(hosts: list[str], gpus: int, hostfile: Path, port: int, train_args: list[str],
                      master: str | None = None) -> list[str]:
    return ["deepspeed", "--hostfile", str(hostfile), "--master_addr", master or hosts[0], "--master_port", str(port),
            "--num_nodes", str(len(hosts)), "--num_gpus", str(gpus), "launch/train.py", *train_args]


def torchrun_command(hosts: list[str], gpus: int, port: int, job_id: str, train_args: list[str],
                     master: str | None = None) -> list[str]:
    """``master``: the rendezvous host when the first node's name is not the address to reach it by."""
    return ["torchrun", "--nnodes", str(len(hosts)), "--nproc_per_node", str(gpus), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"{master or hosts[0]}:{port}", "--rdzv_id", job_id, "launch/train.py", *train_args]


def main(argv: list[str] | None = None, env: dict | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    parser.add_argument("--gpus-per-node", type=int, default=None)
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--hostfile", default="hostfile")
    parser.add_argument("--rdzv-host", default=None,
                        help="address of the rendezvous / master node (default: the first node's name), e.g. its "
                             "InfiniBand name or an IP where node names do not resolve")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: arguments for launch/train.py")
    args = parser.parse_args(argv)
    env = dict(os.environ) if env is None else env
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    try:
        hosts = hostnames(env)
        gpus = args.gpus_per_node or gpus_per_node(env)
        if args.launcher == "deepspeed":
            hostfile = write_hostfile(hosts, gpus, Path(args.hostfile))
            command = deepspeed_command(hosts, gpus, hostfile, args.port, train_args, args.rdzv_host)
        else:
            command = torchrun_command(hosts, gpus, args.port, env.get("SLURM_JOB_ID", "selora"), train_args,
                                       args.rdzv_host)
    except SlurmEnvError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(shlex.join(command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
