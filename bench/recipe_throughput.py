"""Throughput of the full recipe (launch/train.py) under ZeRO-3 on 1..N GPUs of one host, and the 4-bit ZeRO-3
NCCL run checked against a CPU reference.

    python bench/recipe_throughput.py --gpus 1,2 --out docs/benchmarks

Weak scaling: the per-GPU micro-batch is fixed, so N GPUs process N times the tokens per step; efficiency =
tokens/s on N GPUs / (N x tokens/s on 1 GPU). Tokens/s is the median of the logged steps after warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_ADAM = "deepspeed.overrides={optimizer: {params: {torch_adam: true}}}"  # no FusedAdam JIT build
THROUGHPUT = ["--recipe", "llama_selora", "model.preset=llama_1b_bench", "deepspeed.config=zero3", TORCH_ADAM,
              "train.max_steps=30", "train.micro_batch_size=8", "train.gradient_accumulation_steps=1",
              "train.save_every=0", "train.eval_every=0", "train.export_peft=false", "train.tensorboard=false",
              "model.gradient_checkpointing=true", "data.max_length=256", "adapter.r=16"]
QLORA = ["--recipe", "qlora_selora_srlora", "deepspeed.config=zero3", TORCH_ADAM,
         "train.max_steps=12", "train.warmup_steps=2", "train.save_every=0", "train.eval_every=0",
         "srlora.start_step=3", "srlora.interval=3", "srlora.end_step=9", "data.max_train_records=400",
         "train.export_peft=false", "train.tensorboard=false"]


def launch(gpus: int, args: list[str], output_dir: Path) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = ["deepspeed", "--num_gpus", str(gpus), "launch/train.py", *args, f"train.output_dir={output_dir}"]
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:])
        raise SystemExit(f"run failed: {' '.join(command)}")
    return time.time() - start


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", default="1,2")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--work", default="/tmp/selora_bench")
    parser.add_argument("--cpu-reference", default=str(ROOT / "docs" / "benchmarks" / "qlora_zero3_cpu_reference.json"))
    args = parser.parse_args()
    import torch
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for gpus in (int(g) for g in args.gpus.split(",")):
        run_dir = work / f"throughput_{gpus}"
        wall = launch(gpus, THROUGHPUT, run_dir)
        tps = [m["tokens_per_s"] for m in metrics(run_dir) if "tokens_per_s" in m and m["step"] > 5]
        rows.append({"gpus": gpus, "tokens_per_s": statistics.median(tps), "wall_s": wall})
        print(rows[-1], flush=True)
    for row in rows:
        row["efficiency"] = row["tokens_per_s"] / (row["gpus"] * rows[0]["tokens_per_s"])
    (out / "zero3_recipe.json").write_text(json.dumps({"throughput": rows}, indent=2))  # kept if what follows fails
    qlora_dir = work / "qlora"
    launch(2, QLORA, qlora_dir)
    gpu_losses = [m["loss"] for m in metrics(qlora_dir) if "loss" in m]
    reference = json.loads(Path(args.cpu_reference).read_text())
    cpu_losses = reference["losses"]
    relative = max(abs(g - c) / abs(c) for g, c in zip(gpu_losses, cpu_losses))
    device = torch.cuda.get_device_name()
    table = ["| GPUs | tokens/s (median) | scaling efficiency | wall (s) |", "|---|---|---|---|"]
    table += [f"| {r['gpus']} | {r['tokens_per_s']:.0f} | {r['efficiency']:.3f} | {r['wall_s']:.0f} |" for r in rows]
    text = (f"# Full recipe under ZeRO-3: throughput and a 4-bit NCCL run\n\n{device}, torch {torch.__version__}. "
            f"`llama_selora` (r=16) on the `llama_1b_bench` preset (random weights, 1.3B parameters), "
            f"micro-batch 8 x up to 256 tokens per GPU, gradient checkpointing, ZeRO-3 over NCCL, 30 steps; "
            f"weak scaling.\n\n" + "\n".join(table) +
            f"\n\n4-bit base under ZeRO-3 with NCCL (`qlora_selora_srlora`, 2 GPUs, bf16, recompositions at steps "
            f"3, 6, 9) vs the same run on 2 CPU ranks with gloo in fp32 ({reference['command']}): largest relative "
            f"loss difference over {len(gpu_losses)} steps {relative:.4f}.\n\nGPU losses: "
            f"{[round(x, 4) for x in gpu_losses]}\nCPU losses: {[round(x, 4) for x in cpu_losses]}\n")
    print(text)
    (out / "zero3_recipe.md").write_text(text)
    (out / "zero3_recipe.json").write_text(json.dumps({"device": device, "throughput": rows, "qlora_gpu_losses": gpu_losses,
                                                       "qlora_cpu_losses": cpu_losses, "max_relative_diff": relative}, indent=2))


if __name__ == "__main__":
    main()
