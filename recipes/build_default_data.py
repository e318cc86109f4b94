"""Regenerates configs/data/: the instruction set the default recipe trains on (arithmetic word problems with
worked answers ending "The answer is N."), its held-out eval set, and a small chat-format example.

It samples, deterministically, from the LLM-Adapters collection (alpaca layout: instruction / input / output /
answer; Apache-2.0) that lives beside a developer checkout in ../shared/data/llm-adapters. The project never
reads that directory at run time: this script is run by hand and its output is committed.

Two traps of math_data.json are removed: it was drawn from the math test sets (every question of the AddSub,
SingleEq, MultiArith and gsm8k test sets is dropped, so the eval set is held out), and many worked solutions
state a final number other than the record's ``answer`` (those records are dropped).

    python recipes/build_default_data.py [--source ../shared/data/llm-adapters]
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_SETS = ("AddSub", "SingleEq", "MultiArith", "gsm8k")
EVAL = {"AddSub/test.json": 30, "SingleEq/test.json": 30, "MultiArith/test.json": 20}
CHAT_EXAMPLES = 20
STATED = re.compile(r"The answer is\s*\$?\s*(-?[\d,]*\.?\d+)")


def question_key(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def states_its_answer(record: dict) -> bool:
    """True when the worked solution's last "The answer is N" equals the record's numeric ``answer``."""
    numbers = STATED.findall(record["output"])
    return bool(numbers) and abs(float(numbers[-1].replace(",", "")) - float(record["answer"])) < 1e-3


def training_records(source: Path) -> list[dict]:
    tested = {question_key(r["instruction"]) for name in TEST_SETS
              for r in json.loads((source / name / "test.json").read_text())}
    records = json.loads((source / "math_data.json").read_text())
    return [r for r in records if question_key(r["instruction"]) not in tested and states_its_answer(r)]


def eval_records(source: Path, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for name, count in EVAL.items():
        records += rng.sample([r for r in json.loads((source / name).read_text()) if states_its_answer(r)], count)
    return records


def as_chat(record: dict) -> dict:
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return {"messages": [{"role": "system", "content": "You are a careful assistant."},
                         {"role": "user", "content": prompt},
                         {"role": "assistant", "content": record["output"].strip()}]}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "llm-adapters"))
    args = parser.parse_args()
    source, out = Path(args.source), ROOT / "configs" / "data"
    train = training_records(source)
    random.Random(0).shuffle(train)
    evaluation = eval_records(source, seed=1)
    write_jsonl(out / "default_instructions.jsonl", train)
    write_jsonl(out / "default_eval.jsonl", evaluation)
    write_jsonl(out / "example_chat.jsonl", [as_chat(r) for r in train[:CHAT_EXAMPLES]])
    print(f"wrote {len(train)} train, {len(evaluation)} eval, {CHAT_EXAMPLES} chat records to {out}")


if __name__ == "__main__":
    main()
