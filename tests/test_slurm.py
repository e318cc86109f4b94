"""launch/slurm: node-list expansion, hostfile, launch commands, the sbatch script with stubs, and the sbatch
script for real (stand-in srun and scontrol): two nodes x two ranks, each node in its own network namespace, a
job stopped by signals, requeued, a rank killed, resumed exactly; and a stop before the first step."""
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port
from launch.slurm import hostfile as hf

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("nodelist, expected", [
    ("node7", ["node7"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[01-02],login5", ["gpu01", "gpu02", "login5"]),
    ("a[1-2]-ib,b[009-010]", ["a1-ib", "a2-ib", "b009", "b010"]),
    ("x[8]", ["x8"]),
])
def test_expand_nodelist(nodelist, expected):
    assert hf.expand_nodelist(nodelist) == expected


@pytest.mark.parametrize("nodelist, message", [
    ("gpu[01-03", "unmatched '\\['"), ("gpu01]", "unmatched '\\]'"), ("gpu[3-1]", "range '3-1'"),
    ("gpu[a-b]", "range 'a-b'"), ("", "empty"),
])
def test_malformed_nodelists_are_named(nodelist, message):
    with pytest.raises(hf.SlurmEnvError, match=message):
        hf.expand_nodelist(nodelist)


def test_hostfile_and_commands(tmp_path, capsys):
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "42"}
    path = tmp_path / "hosts"
    assert hf.main(["--launcher", "deepspeed", "--hostfile", str(path), "--port", "6000", "--", "--recipe", "r",
                    "a=1"], env=env) == 0
    assert path.read_text() == "gpu01 slots=4\ngpu02 slots=4\n"
    assert capsys.readouterr().out.strip() == (
        f"deepspeed --hostfile {path} --master_addr gpu01 --master_port 6000 --num_nodes 2 --num_gpus 4 "
        "launch/train.py --recipe r a=1")
    assert hf.main(["--", "--recipe", "r"], env={**env, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:8"}) == 0
    assert capsys.readouterr().out.strip() == ("torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d "
                                               "--rdzv_endpoint gpu01:29500 --rdzv_id 42 launch/train.py --recipe r")


def test_missing_variables_give_one_line_errors(capsys):
    assert hf.main(["--", "--recipe", "r"], env={}) == 2
    assert "SLURM_JOB_NODELIST is not set" in capsys.readouterr().err
    assert hf.main(["--", "--recipe", "r"], env={"SLURM_JOB_NODELIST": "n1"}) == 2
    assert "--gpus-per-node" in capsys.readouterr().err
    assert hf.main(["--", "--recipe", "r"], env={"SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "lots"}) == 2
    assert "SLURM_GPUS_ON_NODE='lots'" in capsys.readouterr().err


def test_sbatch_syntax_and_one_line_node_count():
    script = (ROOT / "launch" / "slurm" / "train.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm" / "train.sbatch")]).returncode == 0
    assert sum(line.startswith("#SBATCH --nodes=") for line in script.splitlines()) == 1


@pytest.mark.parametrize("launcher, stub", [("torchrun", "srun"), ("deepspeed", "deepspeed")])
def test_sbatch_runs_the_launch_command_in_a_fake_allocation(tmp_path, launcher, stub):
    """Run train.sbatch for real with srun/deepspeed replaced by stubs that record their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "called"
    for name in ("srun", "deepspeed", "scontrol"):
        body = f'echo "{name} $*" >> {record}\n' if name != "scontrol" else "exit 1\n"
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_ID": "9",
           "SLURM_SUBMIT_DIR": str(tmp_path), "LAUNCHER": launcher, "RECIPE": "qlora_selora"}
    (tmp_path / "launch").symlink_to(ROOT / "launch")
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm" / "train.sbatch"), "train.max_steps=5"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    called = record.read_text()
    assert called.startswith(f"{stub} ")
    assert "--recipe qlora_selora deepspeed.config=zero3 train.resume=auto train.max_steps=5" in called
    if launcher == "torchrun":
        assert "--kill-on-bad-exit=1 bash -c torchrun --nnodes 2 --nproc_per_node 2" in called
        assert "--rdzv_endpoint node1:29500 --rdzv_id 9" in called
    else:
        assert "--hostfile hostfile-9 --master_addr node1" in called
        assert (tmp_path / "hostfile-9").read_text() == "node1 slots=2\nnode2 slots=2\n"


def test_rendezvous_host_override(capsys):
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "42"}
    assert hf.main(["--rdzv-host", "10.0.0.7", "--", "--recipe", "r"], env=env) == 0
    assert "--rdzv_endpoint 10.0.0.7:29500 --rdzv_id 42" in capsys.readouterr().out


# ----- the sbatch script end to end: 2 nodes x 2 ranks in network namespaces, stopped, requeued, killed ----------
STEPS = 8
ARGS = ["--recipe", "llama_selora_srlora", "model.preset=tiny_llama", f"train.max_steps={STEPS}", "train.save_every=3",
        "train.eval_every=4", "train.warmup_steps=1", "train.learning_rate=3e-3", "data.max_train_records=200",
        "srlora.schedule=fixed", "srlora.start_step=2", "srlora.interval=2", "srlora.end_step=6",
        "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"]
FAULTS = ROOT / "tests" / "fault_injection"


def sbatch(tmp_path: Path, job_id: str, output_dir: Path, nodes: list[str], netns: list[str] | None = None,
           ranks_per_node: int = 2, restarts: int = 0, extra_env: dict | None = None):
    """train.sbatch, started as SLURM starts a batch job (in the background: the caller waits or signals it),
    with tests/fake_slurm's srun and scontrol; with ``netns``, each node in its own network namespace."""
    (tmp_path / "launch").is_symlink() or (tmp_path / "launch").symlink_to(ROOT / "launch")
    (tmp_path / "pids").mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{ROOT / 'tests' / 'fake_slurm'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "SLURM_JOB_NODELIST": ",".join(nodes), "SLURM_NNODES": str(len(nodes)),
           "SLURM_GPUS_ON_NODE": str(ranks_per_node), "SLURM_JOB_ID": job_id, "SLURM_RESTART_COUNT": str(restarts),
           "SLURM_SUBMIT_DIR": str(tmp_path), "SRUN_PID_DIR": str(tmp_path / "pids"),
           "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "PORT": str(free_port()),
           "RECIPE": "llama_selora_srlora", **(extra_env or {})}
    if netns:
        env["SRUN_NETNS"] = " ".join(netns)  # nodes meet by name: node1 resolves to its namespace's address
    else:
        env["RDZV_HOST"] = "127.0.0.1"
    log = open(tmp_path / f"{output_dir.name}.log", "a")
    log.write(f"\n===== job {job_id}, restart {restarts}\n")
    log.flush()
    return subprocess.Popen(["bash", str(ROOT / "launch" / "slurm" / "train.sbatch"), *ARGS[2:],
                             f"train.output_dir={output_dir}"], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def requeues(tmp_path: Path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def latest(output_dir: Path) -> str:
    return (output_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture
def two_node_network():
    """Two network namespaces joined by a veth pair, 10.254.N.1 and .2, names node1/node2 in their hosts files;
    removed afterwards. Nothing is routed outside them."""
    tag = os.getpid() % 250
    names, links = [f"selora{tag}n1", f"selora{tag}n2"], [f"sel{tag}a", f"sel{tag}b"]
    hosts = "127.0.0.1 localhost\n" + "".join(f"10.254.{tag}.{i} node{i}\n" for i in (1, 2))
    commands = [["ip", "netns", "add", names[0]], ["ip", "netns", "add", names[1]],
                ["ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1]]]
    for i, (name, link) in enumerate(zip(names, links), 1):
        commands += [["ip", "link", "set", link, "netns", name],
                     ["ip", "-n", name, "addr", "add", f"10.254.{tag}.{i}/24", "dev", link],
                     ["ip", "-n", name, "link", "set", link, "up"], ["ip", "-n", name, "link", "set", "lo", "up"]]
    try:
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
            pytest.skip("network namespaces need root, `ip` (iproute2) and `unshare` (util-linux)")
        for command in commands:
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                pytest.skip(f"cannot make network namespaces here: {' '.join(command)}: {result.stderr.strip()}")
        for name in names:
            (Path("/etc/netns") / name).mkdir(parents=True, exist_ok=True)
            (Path("/etc/netns") / name / "hosts").write_text(hosts)
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)  # also removes the veth pair
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def wait_for(condition, process, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while not condition() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)


@pytest.mark.multinode
def test_two_nodes_stopped_requeued_killed_resume_exactly(tmp_path, two_node_network):
    """One job's life on 2 nodes x 2 ranks (ZeRO-3 over gloo, each node its own address): SLURM's warning
    signal mid-training -> every rank stops after the same step with a checkpoint -> the job requeues itself;
    the requeued job resumes, one rank gets SIGTERM while a periodic checkpoint is being written -> stop at that
    step, requeue; the next leg's rank 0 is SIGKILLed just before a checkpoint would become `latest` -> every
    process exits within the bound, `latest` stays at the previous one, no requeue from the script (SLURM
    requeues a failed node's job itself); the last leg gets a signal after the last step, finishes, does not
    requeue, and its losses, SRLoRA events and adapter equal an uninterrupted run's exactly."""
    started = time.time()
    legs = []
    lap = lambda: legs.append(round(time.time() - started - sum(legs)))  # noqa: E731
    from safetensors.torch import load_file
    from test_recipe_multiprocess import events, last_step, losses
    from recipes.checkpoint import validate_checkpoint

    nodes = ["node1", "node2"]
    run = lambda job, out, **kw: sbatch(tmp_path, job, out, nodes, two_node_network, **kw)  # noqa: E731
    straight = tmp_path / "straight"
    assert run("100", straight).wait(timeout=900) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    assert sorted(losses(straight)) == list(range(1, STEPS + 1))

    lap()
    # 1. the warning signal (USR1 to the batch script) in the middle of training
    out, log = tmp_path / "job", tmp_path / "job.log"
    job = run("101", out)
    wait_for(lambda: last_step(out) >= 1, job)
    signalled = time.time()
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
    stop_seconds = time.time() - signalled
    stopped_at = int(latest(out).removeprefix("step_"))
    assert 1 <= stopped_at < 6 and requeues(tmp_path) == ["requeue 101"], log.read_text()[-3000:]
    assert (f"stopped on request (stop file {tmp_path}/logs/selora-101.stop) after step {stopped_at} of {STEPS}"
            in log.read_text())
    assert max(losses(out)) == stopped_at

    lap()
    # 2. requeued; rank 2 gets SIGTERM while it writes its shard of the periodic step-6 checkpoint
    at_save = {"PYTHONPATH": f"{FAULTS}{os.pathsep}{ROOT}", "SELORA_SIGNAL_ON_OPEN": "*/step_6/engine/*zero_pp_rank_2_*"}
    assert run("101", out, restarts=1, extra_env=at_save).wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text().split("===== job 101, restart 1")[1]
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at}'}" in text
    assert f"stopped on request (another rank was asked) after step 6 of {STEPS}" in text  # rank 0 was not signalled
    assert latest(out) == "step_6" and requeues(tmp_path) == ["requeue 101"] * 2
    assert not (out / "checkpoints" / "step_7").exists()  # the stop reused the periodic checkpoint

    lap()
    # 3. requeued; rank 0 is SIGKILLed as it would make step_8 the latest: the others must not wait for it
    stamp = tmp_path / "killed_at"
    kill = {"PYTHONPATH": f"{FAULTS}{os.pathsep}{ROOT}", "SELORA_KILL_BEFORE_POINTER": str(STEPS),
            "SELORA_KILL_STAMP": str(stamp)}
    assert run("101", out, restarts=2, extra_env=kill).wait(timeout=600) != 0
    exit_seconds = time.time() - float(stamp.read_text())
    text = log.read_text().split("===== job 101, restart 2")[1]
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s+exitcode\s*:\s*-9", text), text[-3000:]  # torchrun
    assert re.search(rf"rank [123]: failed after optimizer step {STEPS} ", text), text[-3000:]  # a survivor
    assert latest(out) == "step_6" and validate_checkpoint(out / "checkpoints" / "step_6")["step"] == 6
    assert requeues(tmp_path) == ["requeue 101"] * 2
    assert exit_seconds < 45, exit_seconds

    lap()
    # 4. requeued; SIGUSR1 to rank 0 while it writes the final adapter (after the last step): it finishes
    after_last = {"PYTHONPATH": f"{FAULTS}{os.pathsep}{ROOT}", "SELORA_SIGNAL_ON_OPEN": f"{out}/adapter/*",
                  "SELORA_SIGNAL": "SIGUSR1"}
    assert run("101", out, restarts=3, extra_env=after_last).wait(timeout=600) == 0, log.read_text()[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_6'}" in log.read_text().split("restart 3")[1]
    assert requeues(tmp_path) == ["requeue 101"] * 2  # nothing left: no requeue
    assert losses(out) == losses(straight) and events(out) == events(straight)
    final, reference = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, straight))
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    lap()
    print(f"\nsignal to exit (stop + checkpoint, 4 ranks): {stop_seconds:.1f} s; "
          f"SIGKILL of rank 0 to the job's exit: {exit_seconds:.1f} s; seconds per launch: {legs}")


@pytest.mark.multinode
def test_a_signal_before_the_first_step_stops_without_a_checkpoint_or_requeue(tmp_path):
    """One rank, one node, through the sbatch script: USR1 as soon as the node started -> the run stops before
    its first step, saves nothing and the job is not requeued (it made no progress, so it never loops)."""
    out = tmp_path / "early"
    job = sbatch(tmp_path, "200", out, ["node1"], ranks_per_node=1)
    wait_for(lambda: (tmp_path / "pids" / "node-0.pid").exists(), job)
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=300) != 0
    text = (tmp_path / "early.log").read_text()
    assert "stopped on request (stop file" in text and "before the first step; nothing was saved" in text, text[-3000:]
    assert not (out / "checkpoints").exists() and requeues(tmp_path) == []
