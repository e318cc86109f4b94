"""Sharded SVD scaling in one command: bench/svd_init.py on 1, 2 and 4 GPUs (ZeRO-3 partitioned weights above one
GPU), every run on the same machine, and one table of seconds and ratios to the one-GPU run.

    python bench/svd_scaling.py --gpus 1,2,4 --out docs/benchmarks

Both methods go through selora's scheduler (`sharded_principal_directions`): randomized SVD of all 224 projections
of a LLaMA-7B shape, and full SVD of the first --full-layers layers (7 matrices each; the default 32 is all 224,
about 4 minutes on one H100, so the whole command takes about 8 minutes on a 4-GPU H100 machine; --full-layers 16
halves the full-SVD part). GPU counts beyond what the machine has are skipped and listed.
Target (issue 15): on 4 GPUs, at most 0.3x the one-GPU time.

Writes svd_scaling.json (every run's raw results) and svd_scaling.md (the table) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_4GPU = 0.3


def run_svd_init(gpus: int, raw: Path, full_layers: int, rank: int, timeout: int) -> dict:
    """One bench/svd_init.py run on ``gpus`` GPUs; its results dict."""
    script = ["bench/svd_init.py", "--out", str(raw), "--full-layers", str(full_layers), "--rank", str(rank)]
    if gpus == 1:
        command = [sys.executable, *script]
    else:
        command = ["deepspeed", "--num_gpus", str(gpus), "--master_port", str(29600 + gpus), *script]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NCCL_NVLS_ENABLE": "0"}
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=timeout)
    return json.loads((raw / f"svd_init_{gpus}gpu.json").read_text())


def table(runs: dict[int, dict]) -> str:
    counts = sorted(runs)
    one = runs.get(1)
    header = "| method | matrices | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in counts) + " | target |"
    lines = [header, "|" + "---|" * (len(counts) + 3)]
    for method, matrices in (("randomized", runs[counts[0]]["matrices"]),
                             ("full", runs[counts[0]]["full_scheduled_matrices"])):
        cells = []
        for n in counts:
            seconds = runs[n][f"{method}_s"]
            ratio = f" ({seconds / one[f'{method}_s']:.2f}x)" if one and n > 1 else ""
            cells.append(f"{seconds:.2f} s{ratio}")
        lines.append(f"| {method} | {matrices} | " + " | ".join(cells) + f" | 4 GPUs <= {TARGET_4GPU}x of 1 |")
    device = runs[counts[0]]["device"]
    return (f"Sharded SVD through selora's scheduler, LLaMA-7B projection shapes, bf16 weights, r = 16, on {device}"
            " (`bench/svd_scaling.py`).\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2,4", help="comma-separated GPU counts")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--full-layers", type=int, default=32, help="layers (7 matrices each) of full SVD")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    args = parser.parse_args()
    import torch
    available = torch.cuda.device_count()
    wanted = [int(n) for n in args.gpus.split(",")]
    skipped = [n for n in wanted if n > available]
    if len(skipped) == len(wanted):
        sys.exit(f"error: --gpus {args.gpus}: this machine has {available} GPU(s); nothing to run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory() as raw:
        for gpus in (n for n in wanted if n <= available):
            runs[gpus] = run_svd_init(gpus, Path(raw), args.full_layers, args.rank, args.timeout)
            # Written after every run: a run cut short still leaves the finished ones on disk.
            report = table(runs) + (f"\nSkipped (not enough GPUs here): {skipped}\n" if skipped else "")
            (out / "svd_scaling.json").write_text(json.dumps({"runs": runs, "skipped_gpu_counts": skipped}, indent=2))
            (out / "svd_scaling.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
