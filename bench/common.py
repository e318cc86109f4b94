"""What every bench script shares: the device, timing a region, interleaved rounds, and dated result files.

Results go to ``<out>/<question>_<YYYY-MM-DD>.{md,json}``; the json carries the date, the device and the git
commit the numbers were measured at (docs/benchmarks/README.md lists the current file of each question).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "docs" / "benchmarks"


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring as help, and ``--out``, the folder for its dated results."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS), help="folder for <question>_<date>.{md,json}")
    return parser


def pick_device(cpu: bool = False) -> tuple[torch.device, torch.dtype, str]:
    """(device, dtype, device name): the GPU in bf16 when there is one and ``cpu`` is not asked, else CPU fp32."""
    if torch.cuda.is_available() and not cpu:
        return torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name()
    return torch.device("cpu"), torch.float32, "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: torch.device, repeats: int = 1, warmup: int = 0) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after ``warmup``: CUDA events on a GPU (device time
    of the region), the host clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def median_range(values) -> tuple[float, float, float]:
    """(median, min, max) of ``values``."""
    values = list(values)
    return statistics.median(values), min(values), max(values)


def git_commit() -> str:
    """HEAD's short hash, with "+changes" where tracked files differ from it (a GPU machine's copy of a working
    tree can carry an older HEAD than the code it runs)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(out: Path | str, question: str, markdown: str | None, data: dict, device: str) -> Path:
    """Writes ``<out>/<question>_<date>.json`` (``data`` plus date, device and commit) and, when given, the
    ``.md`` beside it; returns the json's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d")
    target = out / f"{question}_{date}.json"
    target.write_text(json.dumps({"date": date, "device": device, "commit": git_commit(), **data}, indent=1) + "\n")
    if markdown is not None:
        target.with_suffix(".md").write_text(markdown)
    return target
