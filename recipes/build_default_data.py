"""Regenerates configs/data/: the small instruction set the default recipe trains on.

It samples, deterministically, from the LLM-Adapters collection (alpaca layout: instruction / input / output /
answer; Apache-2.0) that lives beside a developer checkout in ../shared/data/llm-adapters. The project never
reads that directory at run time: this script is run by hand and its output is committed.

    python recipes/build_default_data.py [--source ../shared/data/llm-adapters]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"boolq/train.json": 500, "ARC-Easy/train.json": 400, "openbookqa/train.json": 400, "math_data.json": 300}
EVAL = {"boolq/test.json": 60, "ARC-Easy/test.json": 50, "openbookqa/test.json": 50, "gsm8k/test.json": 40}
CHAT_EXAMPLES = 20


def sample(source: Path, files: dict[str, int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for name, count in files.items():
        data = json.loads((source / name).read_text())
        records += rng.sample(data, count)
    rng.shuffle(records)
    return records


def as_chat(record: dict) -> dict:
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return {"messages": [{"role": "system", "content": "You are a careful assistant."},
                         {"role": "user", "content": prompt},
                         {"role": "assistant", "content": record["output"]}]}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "llm-adapters"))
    args = parser.parse_args()
    source, out = Path(args.source), ROOT / "configs" / "data"
    train, evaluation = sample(source, TRAIN, seed=0), sample(source, EVAL, seed=1)
    write_jsonl(out / "default_instructions.jsonl", train)
    write_jsonl(out / "default_eval.jsonl", evaluation)
    write_jsonl(out / "example_chat.jsonl", [as_chat(r) for r in train[:CHAT_EXAMPLES]])
    print(f"wrote {len(train)} train, {len(evaluation)} eval, {CHAT_EXAMPLES} chat records to {out}")


if __name__ == "__main__":
    main()
