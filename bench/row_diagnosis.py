"""Why a row of recipe_vs_peft.py is as fast as it is: runs named rows once each, with TorchDynamo's recompile and
graph-break logs on and a torch.profiler window (train.profile_steps), and keeps what they wrote.

    python bench/row_diagnosis.py --rows 'recipe plain 4-bit LoRA (padding-free compiled)' --out $OUT

For each row, ``<out>/<row slug>/``: ``stderr.txt`` (the compile logs), ``ops.txt`` (the profile's operator
tables) and ``metrics.jsonl``; the printed summary counts recompilations and graph breaks, with their reasons.
``--python-profile`` profiles the window with cProfile instead (``python.txt``: DeepSpeed's hooks and the loop's
Python by own and cumulative time; ``python.prof``, every function, for pstats), for a host-bound row whose time
goes to Python rather than to operators.
No dated result: this answers "where does the time go", the timed comparison stays in recipe_vs_peft.py.
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, argument_parser
from recipe_vs_peft import RECIPE_ROWS, add_row_arguments, recipe_overrides
from recipes.metrics import read_metrics

SIGNALS = {"recompile": re.compile(r"Recompiling function (\w+)|triggered by the following guard failure"),
           "graph break": re.compile(r"Graph break( in user code)?"),
           "limit": re.compile(r"(cache_size_limit|recompile_limit) reached")}


def summarise(stderr: str) -> dict:
    """Counts of each signal, and the most frequent lines that follow a signal (the reasons)."""
    lines = stderr.splitlines()
    counts = {name: sum(1 for line in lines if pattern.search(line)) for name, pattern in SIGNALS.items()}
    reasons = collections.Counter()
    for index, line in enumerate(lines):
        if any(pattern.search(line) for pattern in SIGNALS.values()):
            reasons[" | ".join(l.strip()[:160] for l in lines[index:index + 3])] += 1
    return {**counts, "reasons": reasons.most_common(6)}


def named_rows(parser, text: str) -> list[tuple]:
    """The RECIPE_ROWS entries ``text`` names (comma-separated), in its order; an unknown name is a usage error."""
    known = {row[0]: row for row in RECIPE_ROWS}
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"--rows: no row named {unknown}")
    return [known[name] for name in names]


def run_row(args, row: tuple, out: Path, extra: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    """Runs one row of recipe_vs_peft.py (``row``: its RECIPE_ROWS entry) with the profile window ``args.profile``
    (cProfile with ``args.python_profile``) and ``extra`` overrides, in its own process; keeps what it wrote in
    ``out``/<row slug>: stderr.txt, ops.txt or python.txt and python.prof, metrics.jsonl. Returns the run and that
    folder."""
    name, engine, method, recipe, row_extra, _core = row
    first, last = args.profile.split(",")
    target = out / re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "launch/train.py", "--recipe", recipe,
                   *recipe_overrides(args, engine, method, list(row_extra) + extra),
                   f"train.output_dir={work}/run", f"train.profile_steps=[{first},{last}]",
                   f"train.profile_python={str(args.python_profile).lower()}"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        if args.torch_logs:  # an empty TORCH_LOGS breaks torch's import
            env["TORCH_LOGS"] = args.torch_logs
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        (target / "stderr.txt").write_text(result.stderr)
        for found, keep in ((Path(work) / "run" / "profile" / "ops.txt", "ops.txt"),
                            (Path(work) / "run" / "profile" / "python.txt", "python.txt"),
                            (Path(work) / "run" / "profile" / "python.prof", "python.prof"),
                            (Path(work) / "run" / "metrics.jsonl", "metrics.jsonl")):
            if found.is_file():
                shutil.copy(found, target / keep)
    return result, target


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--rows", required=True, help="comma-separated row names of recipe_vs_peft.py")
    add_row_arguments(parser, steps=6)
    parser.add_argument("--profile", default="8,9", help="first,last optimizer step of the profile window")
    parser.add_argument("--torch-logs", default="recompiles,graph_breaks")
    parser.add_argument("--extra", default="", help="more overrides for every row, separated by spaces")
    parser.add_argument("--python-profile", action="store_true",
                        help="cProfile over the window (python.txt) instead of torch.profiler (ops.txt)")
    args = parser.parse_args(argv)
    args.breakdown = False
    rows = named_rows(parser, args.rows)
    out = Path(args.out)
    first, last = args.profile.split(",")
    for row in rows:
        name = row[0]
        result, target = run_row(args, row, out, args.extra.split())
        summary = summarise(result.stderr)
        metrics = read_metrics(target / "metrics.jsonl") if (target / "metrics.jsonl").is_file() else []
        speeds = [line["tokens_per_s"] for line in metrics
                  if "tokens_per_s" in line and line["step"] > args.warmup and not int(first) <= line["step"] <= int(last)]
        first_loss = next((line["loss"] for line in metrics if line.get("step") == 1), None)
        print(f"== {name}: exit {result.returncode}; recompiles {summary['recompile']}, graph breaks "
              f"{summary['graph break']}, limit hits {summary['limit']}; tokens/s (unprofiled steps) "
              f"{statistics.median(speeds) if speeds else None}; first loss {first_loss}")
        for reason, count in summary["reasons"]:
            print(f"   {count} x {reason}")
        if result.returncode != 0:
            print("   " + "\n   ".join(result.stderr.strip().splitlines()[-5:]))


if __name__ == "__main__":
    main()
