"""Host work per optimizer step, counted rather than timed: the Python function calls (cProfile) that rows of
recipe_vs_peft.py make per optimizer step on a deep, narrow LLaMA on the CPU (configs/models/host_probe.yaml: 32
layers, 64 wide), where an engine's per-layer and per-weight Python is most of the step. Counts, unlike CPU
timings, do not drift with the host: this is the CPU's view of what makes a GPU step host-bound (the 1.3B shape),
to weigh a change before a GPU times it. The timed comparison stays in recipe_vs_peft.py.

    OMP_NUM_THREADS=1 python bench/host_calls.py

Prints and writes (``host_calls_<date>.{md,json}``), per row: calls per optimizer step, against the first row,
DeepSpeed's share of them, and the functions that add most calls over the first row.
"""
from __future__ import annotations

import collections
import pstats
import re
import tempfile
from pathlib import Path

from common import argument_parser, write_results
from recipe_vs_peft import add_row_arguments
from row_diagnosis import named_rows, run_row

DEFAULT_ROWS = ("recipe plain LoRA (padding-free),recipe ZeRO-2 LoRA (padding-free),recipe ZeRO-3 LoRA (padding-free),"
                "recipe ZeRO-3 LoRA (padding-free fetch hooks)")
# A function of DeepSpeed's, by the file cProfile names it with.
DEEPSPEED_FILE = re.compile(r"(^|[\\/])deepspeed[\\/]")


def calls_by_function(profile: Path) -> collections.Counter:
    """Calls of each function (file:line(name), the site-packages prefix and object addresses dropped, so that two
    processes' names match) in a cProfile dump."""
    counts = collections.Counter()
    for (file, line, name), (_, calls, *_rest) in pstats.Stats(str(profile)).stats.items():
        counts[re.sub(r" at 0x[0-9a-f]+", "", f"{file.split('site-packages/')[-1]}:{line}({name})")] += calls
    return counts


def table(rows: list[dict], steps: int) -> str:
    lines = [f"| row | Python calls per optimizer step | x {rows[0]['row']} | DeepSpeed's |", "|---|---|---|---|"]
    base = rows[0]["calls_per_step"]
    for row in rows:
        lines.append(f"| {row['row']} | {row['calls_per_step']:,.0f} | {row['calls_per_step'] / base:.2f} | "
                     f"{row['deepspeed_calls_per_step']:,.0f} |")
    for row in rows[1:]:
        lines += ["", f"Most calls added per step by `{row['row']}` over the first row:", ""]
        lines += [f"- {added:+,.0f} `{function}`" for function, added in row["most_added"]]
    return "\n".join(lines) + f"\n\n(cProfile over {steps} optimizer steps of each row.)\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argument_parser(__doc__)
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated row names of recipe_vs_peft.py")
    add_row_arguments(parser, steps=4)
    parser.set_defaults(shape="host_probe", batch=2, warmup=4)
    parser.add_argument("--profile", default="6,7", help="first,last optimizer step counted (after the warm-up)")
    args = parser.parse_args(argv)
    args.breakdown, args.python_profile, args.torch_logs = False, True, ""
    wanted = named_rows(parser, args.rows)
    first, last = (int(step) for step in args.profile.split(","))
    steps = last - first + 1
    rows, base = [], None
    with tempfile.TemporaryDirectory() as work:
        for row in wanted:
            name = row[0]
            result, target = run_row(args, row, Path(work), [])
            if result.returncode != 0 or not (target / "python.prof").is_file():
                raise SystemExit(f"{name}: the run failed:\n" + "\n".join(result.stderr.strip().splitlines()[-8:]))
            counts = calls_by_function(target / "python.prof")
            base = counts if base is None else base
            added = collections.Counter({function: counts[function] - base[function] for function in counts})
            rows.append({"row": name, "calls_per_step": sum(counts.values()) / steps,
                         "deepspeed_calls_per_step": sum(c for f, c in counts.items() if DEEPSPEED_FILE.search(f)) / steps,
                         "most_added": [(f, c / steps) for f, c in added.most_common(8) if c > 0]})
            print(f"== {name}: {rows[-1]['calls_per_step']:,.0f} Python calls per optimizer step")
    markdown = (f"# Host work per optimizer step, counted (shape {args.shape}, {args.batch} x {args.seq}, CPU)\n\n"
                + table(rows, steps))
    print(markdown)
    write_results(args.out, "host_calls", markdown, {"shape": args.shape, "batch": args.batch, "seq": args.seq,
                                                     "steps_counted": steps, "rows": rows}, "cpu")
    return rows


if __name__ == "__main__":
    main()
