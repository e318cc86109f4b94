"""Accuracy and answer loss of a model on LLM-Adapters-style tasks (alpaca records with a gold ``answer``).

The kind of a task is inferred from its answers:
  math    every answer is a number: greedy generation, the number after "The answer is" (else the last number)
          compared with a tolerance (see recipes/inference.py: 1e-3 absolute or 1e-4 relative)
  choice  answers are a few labels (true/false, answer1..answer5, option1..): each label's answer text is the
          record's ``output`` with its gold label replaced by that label (LLM-Adapters writes "the correct
          answer is answer2"); the label whose text has the highest log-likelihood (summed over its tokens,
          prompt formatted exactly as in training) is the prediction
For every task the answer loss is the mean negative log-likelihood per target token of the records' own
``output`` (the training loss, masked the same way), a second view that does not depend on decoding.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from recipes import inference
from recipes.data import DataError, encode_prompt, load_records

MAX_CHOICE_LABELS = 16


@dataclass
class Task:
    name: str
    kind: str                      # "math" | "choice"
    records: list[dict]            # instruction, input, output, answer, source
    labels: list[str]              # choice: every label seen in the task's answers; math: []


def _is_number(text: str) -> bool:
    try:
        float(str(text).replace(",", ""))
        return True
    except ValueError:
        return False


def load_task(name: str, path: str, max_records: int | None = None, seed: int = 0) -> Task:
    """Validated records of ``path`` (alpaca JSON/JSONL with ``answer``), at most ``max_records`` of them (a
    seeded sample, in file order), and the task's kind. Raises DataError naming the file, record and field."""
    records = [dict(r) for r in load_records(path, "alpaca")]
    for record in records:
        if not str(record.get("answer") or "").strip():
            raise DataError(f"{record['source']}: field 'answer' is missing or empty; evaluation needs each "
                            "record's gold answer (a number, or a label such as true / answer2)")
    if max_records and max_records < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), max_records))
        records = [records[i] for i in keep]
    answers = [str(r["answer"]).strip() for r in records]
    if all(_is_number(a) for a in answers):
        return Task(name, "math", records, [])
    labels = sorted(set(answers))
    if len(labels) > MAX_CHOICE_LABELS:
        raise DataError(f"task {name} ({path}): {len(labels)} distinct non-numeric answers (e.g. {labels[:3]}); "
                        f"expected numbers (math) or at most {MAX_CHOICE_LABELS} labels (multiple choice)")
    for record in records:
        if str(record["answer"]).strip() not in record["output"]:
            raise DataError(f"{record['source']}: field 'output' does not contain the answer label "
                            f"{record['answer']!r}, so the other labels' answer texts cannot be built from it")
    return Task(name, "choice", records, labels)


def label_output(record: dict, label: str) -> str:
    """The record's ``output`` answering ``label`` instead of its gold label (its last occurrence replaced)."""
    gold = str(record["answer"]).strip()
    head, _, tail = record["output"].rpartition(gold)
    return head + label + tail


def _shard(task: Task, rank: int, world_size: int, tokenizer) -> list[dict]:
    """This rank's records, longest prompts first (less padding per batch; results do not depend on order)."""
    mine = task.records[rank::world_size]
    return sorted(mine, key=lambda r: -len(encode_prompt(r, tokenizer)))


def evaluate_task(model, tokenizer, task: Task, batch_size: int = 8, max_new_tokens: int = 160,
                  rank: int = 0, world_size: int = 1, generate_batch_size: int | None = None) -> dict:
    """{"kind", "n", "accuracy", "answer_loss", "seconds"} over all ranks (each scores its shard; sums are
    all-reduced, so every rank returns the same numbers). answer_loss is in nats per target token.

    ``batch_size`` rows are scored at once (full-sequence logits: batch x length x vocabulary floats);
    ``generate_batch_size`` (default: batch_size) prompts are generated at once, which keeps only the last
    position's logits and a small KV cache, so it can be several times larger: a greedy decode step costs about
    the same for 32 rows as for 128 on a GPU, and generation is most of an evaluation's time."""
    started = time.perf_counter()
    records = _shard(task, rank, world_size, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_record = len(task.labels) if task.kind == "choice" else 2  # work units: scored texts or generate + score
    progress = tqdm(total=len(records) * per_record, desc=task.name, disable=rank != 0, dynamic_ncols=True)
    if task.kind == "choice":
        examples = [inference.scored_example(r, tokenizer, label_output(r, label))
                    for r in records for label in task.labels]
        scores = inference.answer_losses(model, examples, pad, batch_size, progress)
        correct, nll, tokens = 0, 0.0, 0
        for index, record in enumerate(records):
            own = scores[index * len(task.labels):(index + 1) * len(task.labels)]
            best = min(range(len(own)), key=lambda k: own[k][0])  # lowest summed NLL = highest likelihood
            gold = task.labels.index(str(record["answer"]).strip())
            correct += int(best == gold)
            nll, tokens = nll + own[gold][0], tokens + own[gold][1]
    else:
        prompts = [encode_prompt(r, tokenizer) for r in records]
        texts = inference.generate(model, tokenizer, prompts, max_new_tokens, generate_batch_size or batch_size,
                                   progress=progress)
        correct = sum(inference.numbers_match(inference.extract_number(t), float(str(r["answer"]).replace(",", "")))
                      for t, r in zip(texts, records))
        scores = inference.answer_losses(model, [inference.scored_example(r, tokenizer, r["output"]) for r in records],
                                         pad, batch_size, progress)
        nll, tokens = sum(s for s, _ in scores), sum(c for _, c in scores)
    progress.close()
    totals = torch.tensor([correct, len(records), nll, tokens], dtype=torch.float64,
                          device=next(model.parameters()).device)
    if world_size > 1:
        dist.all_reduce(totals)
    correct, n, nll, tokens = totals.tolist()
    return {"kind": task.kind, "n": int(n), "accuracy": correct / n if n else float("nan"),
            "answer_loss": nll / tokens if tokens else float("nan"), "seconds": round(time.perf_counter() - started, 2)}
