"""How fast a large ShareGPT file is prepared, and in how much memory: a synthetic file of ``--records`` short
conversations (a system turn, one or two human/gpt exchanges), prepared as the default recipe would (its tokenizer
and chat template, max_length 256, packed rows) by recipes/data_prepare.py in a fresh process on a cold cache
(reading, checking, tokenizing with data.num_proc=auto, packing, writing), then again in a fresh process on the
warm cache (what every later start and every other rank does). Each start's wall time and peak resident memory
(the process's ru_maxrss, its tokenizing workers counted separately) are measured; the file size says what
"memory proportional to the raw JSON" would be.

    python bench/data_prepare.py                         # 1,000,000 records -> docs/benchmarks/data_prepare_<date>.{md,json}
    python bench/data_prepare.py --records 300 --in-process --out /tmp/x   # the CPU smoke (tests/test_bench.py)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, argument_parser, git_commit, write_results

WORDS = ("the of and to in is was for on that with as by at from his her an which were be this are have not "
         "number total each more than how many apples train miles hours price answer step first then so").split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def write_sharegpt(path: Path, records: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(records):
            turns = [{"from": "system", "value": "You are a helpful assistant."}]
            for _ in range(rng.choice((1, 1, 2))):
                turns += [{"from": "human", "value": sentence(rng, 8, 30)},
                          {"from": "gpt", "value": sentence(rng, 10, 50)}]
            handle.write(json.dumps({"conversations": turns}) + "\n")


def anonymous_memory_mb() -> float:
    """This process's resident memory that is not a file's pages (Linux RssAnon): what memory-mapped Arrow data
    does not count in, unlike ru_maxrss, which also counts the mapped files' pages the page cache holds."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def prepare_once(path: str) -> dict:
    """One start: prepare the file (cold or warm cache: $SELORA_CACHE decides); times, memory and the report."""
    import threading
    peak, stop = [anonymous_memory_mb()], threading.Event()

    def sample():
        while not stop.wait(0.2):
            peak[0] = max(peak[0], anonymous_memory_mb())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from recipes import data_prepare
    imported = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "configs" / "tokenizer"))
    cfg = OmegaConf.create(dict(train_files=[path], eval_files=[], format="auto", fields={}, max_length=256,
                                packing=True, padding_free=False, eval_fraction=None, mask_prompt=True,
                                max_train_records=None, max_eval_records=None, mix_records=None, num_proc="auto"))
    prepared = data_prepare.prepare(cfg, tokenizer, seed=0)
    rows = len(prepared.train)
    first = prepared.train[0]["input_ids"][:4]  # touch the memory-mapped data
    done = time.perf_counter()
    stop.set()
    peak[0] = max(peak[0], anonymous_memory_mb())
    return {"peak_anonymous_mb": peak[0], "seconds": done - start, "seconds_after_imports": done - imported, "built": prepared.built,
            "rows": rows, "first_tokens": first, "report": prepared.report,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def start(path: Path, cache: Path, in_process: bool = False) -> dict:
    """A start in a fresh process (its own imports and peak memory), or in this one (the smoke test's quick way)."""
    if in_process:
        before = os.environ.get("SELORA_CACHE")
        os.environ["SELORA_CACHE"] = str(cache)
        try:
            return prepare_once(str(path))
        finally:
            os.environ.pop("SELORA_CACHE") if before is None else os.environ.__setitem__("SELORA_CACHE", before)
    env = {**os.environ, "SELORA_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--child", str(path)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the preparing process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--note", default="", help="a line about the machine's state (e.g. other jobs on the cores)")
    parser.add_argument("--in-process", action="store_true", help="both starts in this process (a quick smoke run; "
                        "the numbers then include this process's own imports and memory)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(prepare_once(args.child)))
        return {}
    with tempfile.TemporaryDirectory(prefix="selora_bench_data_") as scratch:
        scratch = Path(scratch)
        path = scratch / "sharegpt.jsonl"
        t = time.perf_counter()
        write_sharegpt(path, args.records)
        written = time.perf_counter() - t
        file_mb = round(path.stat().st_size / 2**20, 1)
        cold = start(path, scratch / "cache", args.in_process)
        warm = start(path, scratch / "cache", args.in_process)
    assert cold["built"] and not warm["built"] and cold["first_tokens"] == warm["first_tokens"]
    report = cold["report"]
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "cpu_cores": os.cpu_count(), "records": args.records,
              "file_mb": file_mb,
              "file_written_s": round(written, 1), "note": args.note,
              "first_start_s": round(cold["seconds"], 1), "records_per_s": round(args.records / cold["seconds"]),
              "first_start_peak_rss_mb": round(cold["peak_rss_mb"]),
              "first_start_peak_anonymous_mb": round(cold.get("peak_anonymous_mb", -1)),
              "second_start_peak_anonymous_mb": round(warm.get("peak_anonymous_mb", -1)),
              "workers_peak_rss_mb": round(cold["workers_peak_rss_mb"]),
              "second_start_s": round(warm["seconds"], 2),
              "second_start_after_imports_s": round(warm["seconds_after_imports"], 2),
              "second_start_peak_rss_mb": round(warm["peak_rss_mb"]), "tokens": report["lengths"]["total_tokens"],
              "packed_rows": warm["rows"], "row_fill": report.get("row_fill")}
    write_results(args.out, "data_prepare", markdown(result), result, f"CPU, {os.cpu_count()} cores")
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    return f"""# Preparing a large ShareGPT file (bench/data_prepare.py)

{r['records']:,} synthetic short ShareGPT conversations ({r['file_mb']} MB of JSONL), prepared as the default recipe
would (configs/tokenizer and its chat template, max_length 256, packed rows) in a fresh process on a cold cache,
then again in a fresh process on the warm cache. {r['cpu_cores']} CPU cores; commit {r['commit']}, {r['date']}.
{r['note']}

| | first start (cold cache) | second start (warm cache) |
|---|---|---|
| wall time | {r['first_start_s']} s ({r['records_per_s']:,} records/s) \
| {r['second_start_s']} s ({r['second_start_after_imports_s']} s after imports) |
| peak resident memory, main process (ru_maxrss: counts the mapped Arrow files' cached pages) \
| {r['first_start_peak_rss_mb']:,} MB | {r['second_start_peak_rss_mb']:,} MB |
| peak anonymous memory, main process (RssAnon, sampled every 0.2 s; -1: not measured) \
| {r['first_start_peak_anonymous_mb']:,} MB | {r['second_start_peak_anonymous_mb']:,} MB |
| peak memory, largest tokenizing worker | {r['workers_peak_rss_mb']:,} MB | - |

{r['tokens']:,} tokens in {r['packed_rows']:,} packed rows ({(r['row_fill'] or 0):.0%} full). The second start (every
later run, and every rank but the builder) hashes the file, finds the entry and memory-maps it: no reading, no
tokenizing, and memory that does not grow with the data set.
"""


if __name__ == "__main__":
    main()
