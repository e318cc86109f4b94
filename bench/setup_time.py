"""How long the recipe takes to set up its base model before the first step: `recipes.modeling.load_model`, timed
from the call to the model on the device (quantized where asked, CUDA synchronised), each row in a fresh process
whose imports are done before the clock starts.

    python bench/setup_time.py --shape llama2_7b           # one GPU call
    python bench/setup_time.py --smoke                     # CPU, tiny (tests/test_bench.py)

Rows: a local Hugging Face checkpoint of the shape (random bf16 weights written by this script first, so it is
read back from the page cache: disk speed is not in the number), in bf16 and in 4-bit nf4; and the preset itself
(random weights made in the process, as the benchmarks' rows build it), in 4-bit. Results go to
docs/benchmarks/setup_time_<date>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, argument_parser, pick_device, write_results


def child(settings: dict) -> dict:
    """In the fresh process: resolve the recipe's config, then time load_model alone."""
    from launch.config import resolve
    from recipes.modeling import load_model
    cfg = resolve("llama_lora", settings["overrides"])
    device = torch.device(settings["device"])
    started = time.perf_counter()
    model, info = load_model(cfg.model, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    memory = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": seconds, "parameters": info["parameters"], "gpu_memory_gib": memory}


def make_checkpoint(shape: str, folder: Path, device: torch.device) -> float:
    """A Hugging Face checkpoint of ``shape`` with random bf16 weights; returns the seconds it took."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from recipes.modeling import preset_config
    started = time.perf_counter()
    config = AutoConfig.for_model(**preset_config(shape))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def run_row(name: str, overrides: list[str], device: torch.device) -> dict:
    settings = json.dumps({"overrides": overrides, "device": str(device)})
    result = subprocess.run([sys.executable, __file__, "--child", settings], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        return {"name": name, "error": (result.stderr or result.stdout).strip().splitlines()[-1][:300]}
    return {"name": name, **json.loads(result.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__)
    parser.add_argument("--shape", default="llama2_7b", help="a preset of configs/models/")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny_llama, bf16 rows only")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    if args.smoke:
        args.shape = "tiny_llama"
    device, _dtype, device_name = pick_device(cpu=args.smoke)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        checkpoint = Path(work) / "checkpoint"
        written = make_checkpoint(args.shape, checkpoint, device)
        print(f"checkpoint of {args.shape} written in {written:.0f} s", flush=True)
        from_checkpoint = [f"model.path={checkpoint}"]
        plans = [(f"{args.shape} bf16 from a local checkpoint", from_checkpoint)]
        if device.type == "cuda":
            plans += [(f"{args.shape} 4-bit nf4 from a local checkpoint", from_checkpoint + ["model.quantization=4bit"]),
                      (f"{args.shape} 4-bit nf4 preset (random weights)",
                       ["model.path=null", f"model.preset={args.shape}", "model.quantization=4bit"])]
        for name, overrides in plans:
            rows.append(run_row(name, overrides, device))
            print(rows[-1], flush=True)
    lines = [f"# Model set-up time ({device_name})", "",
             "Written by `bench/setup_time.py`: `recipes.modeling.load_model` from the call to the model on the "
             "device, in a fresh process (imports done before the clock starts). The checkpoint is written by the "
             "script just before, so it is read from the page cache: add the disk's read time for a cold start.", "",
             "| row | seconds | parameters | GPU GiB after |", "|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | failed: {row['error']} | | |")
            continue
        memory = "" if row.get("gpu_memory_gib") is None else f"{row['gpu_memory_gib']:.1f}"
        lines.append(f"| {row['name']} | {row['seconds']:.1f} | {row['parameters']:,} | {memory} |")
    table = "\n".join(lines) + "\n"
    question = "setup_time_smoke" if args.smoke else "setup_time"
    write_results(args.out, question, table, {"shape": args.shape, "checkpoint_write_s": written, "rows": rows},
                  device_name)
    print(table)
    return {"rows": rows}


if __name__ == "__main__":
    main()
