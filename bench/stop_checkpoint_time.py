"""How long a graceful stop takes at LLaMA-7B adapter size, on this machine's CPU and disk: the checkpoint write
(what recipes/checkpoint.py writes for it: adapter weights, the optimizer's fp32 master weights and AdamW moments,
the sha256 manifest, the `latest` pointer) and the time from SIGTERM to the process's exit (finish the step in
progress, write that checkpoint, exit 75), which must fit inside train.stop_grace_s (25 s by default).

The adapter: LLaMA-7B (32 layers, hidden 4096, MLP 11008), r=16 on q, k, v, o, gate, up, down: 39,976,960
trainable parameters. The training step is a sleep of --step-seconds (a 7B step's length depends on the GPU);
the signal comes at a random point inside a step.

    python bench/stop_checkpoint_time.py                # 7B-sized, writes docs/benchmarks/stop_checkpoint_time_<date>.json
    python bench/stop_checkpoint_time.py --smoke        # a tiny adapter, seconds, nothing written (tests/test_bench.py)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import argument_parser, write_results

# (in, out) of the targeted projections of one LLaMA-7B layer
SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096), "gate": (4096, 11008),
          "up": (4096, 11008), "down": (11008, 4096)}


def trainable_parameters(layers: int, rank: int, scale: int) -> int:
    return layers * sum(rank * (fan_in + fan_out) // scale for fan_in, fan_out in SHAPES.values())


def adapter(layers: int, rank: int, scale: int) -> dict:
    """A/B factors (bf16, as the adapter file holds them) of every targeted projection; ``scale`` divides widths."""
    import torch
    tensors = {}
    for layer in range(layers):
        for name, (fan_in, fan_out) in SHAPES.items():
            tensors[f"layers.{layer}.{name}.lora_A"] = torch.randn(rank, fan_in // scale, dtype=torch.bfloat16)
            tensors[f"layers.{layer}.{name}.lora_B"] = torch.randn(fan_out // scale, rank, dtype=torch.bfloat16)
    return tensors


def write_checkpoint(output_dir: Path, step: int, weights: dict, optimizer_state: dict) -> float:
    """The files of one checkpoint, written as recipes/checkpoint.py writes them; returns seconds."""
    import torch
    from recipes import checkpoint
    from safetensors.torch import save_file
    started = time.perf_counter()
    step_dir = checkpoint.checkpoints_dir(output_dir) / f"step_{step}"
    (step_dir / "engine").mkdir(parents=True)
    (step_dir / "adapter").mkdir()
    torch.save(optimizer_state, step_dir / "engine" / "optim_states.pt")
    save_file(weights, str(step_dir / "adapter" / "adapter_model.safetensors"))
    record = {"step": step, "files": checkpoint._manifest(step_dir)}
    checkpoint.write_text_atomically(step_dir / checkpoint.TRAINER_STATE_FILE, json.dumps(record))
    checkpoint.write_text_atomically(checkpoint.checkpoints_dir(output_dir) / checkpoint.POINTER_FILE, step_dir.name)
    return time.perf_counter() - started


def child(args) -> int:
    """A stand-in training process: steps of --step-seconds, polls the stop request after each, then saves."""
    import torch
    from recipes.stop_request import STOPPED, StopRequest
    weights = adapter(32, 16, args.scale)
    master = {k: v.float() for k, v in weights.items()}
    optimizer_state = {"fp32": master, "exp_avg": {k: torch.randn_like(v) for k, v in master.items()},
                       "exp_avg_sq": {k: torch.rand_like(v) for k, v in master.items()}}
    stop = StopRequest(["SIGTERM"], grace_s=args.grace).install()
    stop.agreed()  # its first call imports torch.distributed; a training loop has done that long before
    print("ready", flush=True)
    step = 0
    while True:
        time.sleep(args.step_seconds)
        step += 1
        if stop.agreed():
            seconds = write_checkpoint(Path(args.output_dir), step, weights, optimizer_state)
            print(json.dumps({"checkpoint_s": seconds}), flush=True)
            return STOPPED


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__)
    # the stand-in training process that main starts
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="widths / 256: seconds on any CPU")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=2.0)
    parser.add_argument("--grace", type=float, default=25.0)
    args = parser.parse_args(argv)
    if args.child:
        sys.exit(child(args))
    scale = 256 if args.smoke else 1
    rounds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            process = subprocess.Popen([sys.executable, __file__, "--child", "--output-dir", tmp, "--scale",
                                        str(scale), "--step-seconds", str(args.step_seconds), "--grace",
                                        str(args.grace)], stdout=subprocess.PIPE, text=True)
            assert process.stdout.readline().strip() == "ready"
            time.sleep(random.uniform(0, args.step_seconds))  # somewhere inside a step
            signalled = time.perf_counter()
            process.send_signal(signal.SIGTERM)
            result = json.loads(process.stdout.readline())
            status = process.wait()
            exit_s = time.perf_counter() - signalled
            size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        rounds.append({"checkpoint_s": round(result["checkpoint_s"], 2), "signal_to_exit_s": round(exit_s, 2),
                       "exit_status": status, "checkpoint_bytes": size})
    trainable = trainable_parameters(32, 16, scale)
    report = {"what": "graceful stop of a LLaMA-7B r=16 q,k,v,o,gate,up,down adapter: checkpoint write and "
                      "SIGTERM-to-exit", "trainable_parameters": trainable, "step_seconds": args.step_seconds,
              "rounds": rounds}
    print(json.dumps(report, indent=1))
    if not args.smoke:
        write_results(args.out, "stop_checkpoint_time", None, report, f"CPU, {os.cpu_count()} cores (shared)")
    return report


if __name__ == "__main__":
    main()
