"""Instruction-tuning records become tokens: templating, the prompt masked out of the loss, packing, the
train/eval split, and the collate function. Where records come from and how they are checked is
recipes/data_sources.py; the prepared, cached data set a run trains on is recipes/data_prepare.py.

Layouts (recipes/data_sources.py brings every format to one of these):
  alpaca  {"instruction": str, "input": str (optional), "output": str, ...}
  chat    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   (ShareGPT becomes this)
  text    {"text": str}                                                                  (learned whole)

Special tokens are the tokenizer's and its template's, never doubled: BOS is prepended only when the tokenizer
itself adds one (LLaMA-2/3 do; Qwen2 and SmolLM2 do not) and the text does not already start with it (chat
templates that write it); EOS is appended to an answer unless its rendered turn already holds it (ChatML's
``<|im_end|>``, LLaMA-2's ``</s>``).

Alpaca records are rendered with the Stanford-alpaca prompt as plain text for every tokenizer, instruct models
included (not wrapped in the chat template): it is the prompt the LLM-Adapters data and the LoRA-variant papers
use, so losses and accuracies compare with theirs. To train an instruct model through its chat template, give
chat records (``messages``).
"""
from __future__ import annotations

import heapq
import os
from bisect import bisect_left, insort
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recipes.data_sources import FORMATS, DataError, RecordProblem, Source, location, records_of

ROOT = Path(__file__).resolve().parents[1]
IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)

# The Stanford-alpaca prompt, the layout the LLM-Adapters data (and most alpaca-style sets) were built for.
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def format_prompt(record: dict) -> str:
    """The alpaca prompt of a record, without its answer (also used to prompt generation at eval time)."""
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def load_records(path: str, format: str = "auto") -> datasets.Dataset:
    """Validated records of one file (or save_to_disk folder, or cached hub data set) as a `datasets.Dataset` in
    its format's columns (alpaca: instruction/input/output/answer, chat and sharegpt: ``messages``, text:
    ``text``), plus a ``source`` column ("file line N") used in later error messages."""
    if format not in FORMATS:
        raise DataError(f"data.format={format!r}: choose one of {', '.join(FORMATS)}")
    datasets.disable_progress_bars()  # small files: the bars only clutter the log
    source = Source(path=path, format=format)
    records, _ = records_of(source, 0, work=None)
    first = records[0]
    keep = (["messages"] if first["messages"] is not None else ["text"] if first["text"] is not None else
            ["instruction", "input", "output", "answer"])
    records = records.select_columns(keep)
    return records.add_column("source", [location(source, row) for row in range(len(records))])


# ----- tokenization ------------------------------------------------------------------------------------------------
def _segments(record: dict, tokenizer) -> list[tuple[str, bool]]:
    """(text, is_learned) pieces of a record, in order; learned pieces are the answer / assistant turns (all of a
    plain-text record)."""
    if record.get("text") is not None:
        return [(record["text"], True)]
    if record.get("messages") is None:
        return [(format_prompt(record), False), (record["output"], True)]
    messages = record["messages"]
    if getattr(tokenizer, "chat_template", None):
        render = lambda m, gen: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    else:  # a plain fallback layout for tokenizers without a chat template
        def render(m, gen):
            text = "".join(f"<|{x['role']}|>\n{x['content']}\n" for x in m)
            return text + ("<|assistant|>\n" if gen else "")
    pieces, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(messages[:index], True)
            full = render(messages[:index + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                where = f"{record['source']}: " if record.get("source") else ""
                raise DataError(f"{where}the tokenizer's chat template renders earlier turns differently once a "
                                "later turn is added, so the answer cannot be masked; use a template that only "
                                "appends (or data.format=alpaca)")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
    return pieces


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts a text with BOS (its own convention, e.g. LLaMA's add_bos_token)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _encode_pieces(records_pieces: list[list[tuple[str, bool]]], tokenizer, mask_prompt: bool
                   ) -> list[tuple[list[int], list[int], int | None]]:
    """`encode_record` for many records' pieces, their texts tokenized in one call (the same ids, one by one)."""
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    adds_bos = _adds_bos(tokenizer)
    texts = [text for pieces in records_pieces for text, _ in pieces]
    tokens = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for pieces in records_pieces:
        starts_with_bos = bool(bos) and bool(pieces) and pieces[0][0].startswith(bos)
        ids = [tokenizer.bos_token_id] if adds_bos and not starts_with_bos else []
        labels = [IGNORE_INDEX] * len(ids)
        first_learned = None
        for text, learned in pieces:
            piece = list(next(tokens))
            if learned and not (eos and eos in text):
                piece = piece + [tokenizer.eos_token_id]
            if learned and first_learned is None:
                first_learned = len(ids)
            ids += piece
            labels += piece if (learned or not mask_prompt) else [IGNORE_INDEX] * len(piece)
        out.append((ids, labels, first_learned))
    return out


def encode_record(record: dict, tokenizer, mask_prompt: bool = True) -> tuple[list[int], list[int], int | None]:
    """(input_ids, labels, index of the first learned token) of one record, untruncated. Prompt tokens get label
    -100 when ``mask_prompt``; each answer ends with EOS exactly once; a plain-text record is learned whole. The
    one place a record becomes tokens: the recipe's training data, and evaluation's prompts and scored answers
    (recipes/inference.py)."""
    return _encode_pieces([_segments(record, tokenizer)], tokenizer, mask_prompt)[0]


def encode_prompt(record: dict, tokenizer) -> list[int]:
    """Token ids of a record's prompt, exactly as training sees them before the first answer token (what a
    model is given to generate the answer)."""
    ids, _, first_learned = encode_record(record, tokenizer)
    return ids[:first_learned]


def tokenize_records(ds: datasets.Dataset, tokenizer, max_length: int, mask_prompt: bool = True, *,
                     num_proc: int | None = None, cache_file_name: str | None = None, where=None
                     ) -> datasets.Dataset:
    """input_ids / labels / attention_mask per record (see `encode_record`), cut to ``max_length``; rows that carry
    a ``source_id`` (the prepared pipeline's) keep it, with ``full_length`` (tokens before the cut). A record
    whose prompt alone fills ``max_length`` is an error, reported up front: ``where(row)`` (default: the row's
    ``source`` column) says where it is. ``num_proc`` processes tokenize when given (datasets' map)."""
    carried = ["source_id"] if "source_id" in ds.column_names else []

    def encode(batch: dict, indices: list[int]) -> dict:
        keys = list(batch)
        records = [dict(zip(keys, values)) for values in zip(*batch.values())]
        pieces = []
        for index, record in zip(indices, records):
            try:
                pieces.append(_segments(record, tokenizer))
            except DataError as problem:
                raise RecordProblem(-1, index, str(problem)) from None
        out = {"input_ids": [], "labels": [], "attention_mask": [], **{c: batch[c] for c in carried}}
        if carried:
            out["full_length"] = []
        for index, (ids, labels, first_learned) in zip(indices, _encode_pieces(pieces, tokenizer, mask_prompt)):
            if first_learned is None or first_learned >= max_length:
                raise RecordProblem(-1, index, f"the prompt takes {first_learned} tokens but data.max_length="
                                    f"{max_length} leaves no room for the answer; raise data.max_length or shorten "
                                    "the record")
            if carried:
                out["full_length"].append(len(ids))
            out["input_ids"].append(ids[:max_length])
            out["labels"].append(labels[:max_length])
            out["attention_mask"].append([1] * min(len(ids), max_length))
        return out

    if num_proc and num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers; each tokenizes on its own
    try:
        return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names,
                      num_proc=num_proc if num_proc and num_proc > 1 and len(ds) >= 10 * num_proc else None,
                      cache_file_name=cache_file_name, desc="tokenizing")
    except RecordProblem as problem:
        row = ds[problem.row]
        place = where(row) if where else row.get("source", f"record {problem.row}")
        message = problem.message.split(": ", 1)[1] if problem.message.startswith(f"{place}: ") else problem.message
        raise DataError(f"{place}: {message}") from None


def best_fit_rows(lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """Best-fit-decreasing: examples, longest first (ties in dataset order), each go into the row with the least
    room that is enough (the earliest such row on a tie), else a new row. Buckets of rows by free room keep each
    choice O(log max_length), so a million examples take seconds."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    rows: list[list[int]] = []
    free_sizes: list[int] = []  # sorted free-room values that some row has
    buckets: dict[int, list[int]] = {}  # free room -> heap of row numbers
    for index in order.tolist():
        length = int(lengths[index])
        slot = bisect_left(free_sizes, length)
        if slot == len(free_sizes):
            rows.append([index])
            row, free = len(rows) - 1, max_length - length
        else:
            size = free_sizes[slot]
            row = heapq.heappop(buckets[size])
            if not buckets[size]:
                del buckets[size], free_sizes[slot]
            rows[row].append(index)
            free = size - length
        if free > 0:
            if free not in buckets:
                buckets[free] = []
                insort(free_sizes, free)
            heapq.heappush(buckets[free], row)
    return rows


def pack_sequences(ds: datasets.Dataset, max_length: int, cache_file_name: str | None = None) -> datasets.Dataset:
    """Best-fit-decreasing packing (`best_fit_rows`): rows of at most ``max_length`` tokens; an example never
    straddles two rows. Rows come out as full as the lengths allow (greedy packing of consecutive examples leaves
    the gap before every example that did not fit): on the default data 70% full at 256 tokens (most records are
    over half of that) and 96% at 1024, against 62% and less for greedy packing. Each row carries ``position_ids``
    that restart at 0 for every example: the model then keeps attention inside each example (transformers builds a
    block-diagonal causal mask from restarting positions) and each example sees the positions it would see alone.
    Deterministic. Rows are gathered in Arrow, a chunk at a time, and written to ``cache_file_name`` when given
    (memory-mapped, for large sets), else kept in memory."""
    columns = ds.select_columns(["input_ids", "labels", "attention_mask"]).with_format("arrow")
    lengths = pc.list_value_length(columns[:]["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = best_fit_rows(lengths, max_length)
    writer = None
    if cache_file_name:
        from datasets.arrow_writer import ArrowWriter
        writer = ArrowWriter(path=cache_file_name)
    chunks = []
    for start in range(0, len(rows), 4096):
        chunk = rows[start:start + 4096]
        members = np.fromiter((i for row in chunk for i in row), dtype=np.int64)
        taken = columns[members.tolist()] if len(members) else None
        member_lengths = lengths[members]
        row_lengths = np.array([lengths[row].sum() for row in chunk], dtype=np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(row_lengths)]), type=pa.int32())
        starts = np.repeat(np.cumsum(member_lengths) - member_lengths, member_lengths)
        positions = np.arange(int(member_lengths.sum()), dtype=np.int64) - starts
        table = pa.table({name: pa.ListArray.from_arrays(offsets, pc.list_flatten(taken[name]).combine_chunks()
                                                         if isinstance(taken[name], pa.ChunkedArray) else
                                                         pc.list_flatten(taken[name]))
                          for name in ("input_ids", "labels", "attention_mask")}
                         | {"position_ids": pa.ListArray.from_arrays(offsets, pa.array(positions))})
        if writer is not None:
            writer.write_table(table)
        else:
            chunks.append(table)
    if writer is not None:
        writer.finalize()
        return datasets.Dataset.from_file(cache_file_name)
    from datasets.table import InMemoryTable
    return datasets.Dataset(InMemoryTable(pa.concat_tables(chunks)))


def train_eval_split(ds: datasets.Dataset, eval_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Deterministic split; eval gets at least one record."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction={eval_fraction}: must be in (0, 1), or give data.eval_files")
    if len(ds) < 2:
        raise DataError(f"only {len(ds)} record(s): too few to split off an eval set; give data.eval_files")
    parts = ds.train_test_split(test_size=max(1, round(eval_fraction * len(ds))), seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def limit_records(ds: datasets.Dataset, limit, seed: int) -> datasets.Dataset:
    """At most ``limit`` examples (a seeded choice); all when ``limit`` is None."""
    return ds.shuffle(seed=seed).select(range(min(int(limit), len(ds)))) if limit else ds


def make_collate_fn(pad_token_id: int, pad_to_multiple_of: int = 1, max_length: int | None = None,
                    padding_free: bool = False):
    """The collate function for the DataLoader.

    Padded (the default): right-pads a list of examples to the longest, rounded up to a multiple of
    ``pad_to_multiple_of`` (and never past ``max_length``); labels are padded with -100. Packed examples (rows
    with ``position_ids``, see `pack_sequences`) bring their positions along, so attention stays inside each
    packed example.

    ``padding_free``: the whole micro-batch as one row, examples end to end with positions restarting at 0 for
    each, so no position is spent on padding (transformers keeps attention inside each example from the
    restarting positions, as for packed rows); only the row's end is padded, up to a multiple of
    ``pad_to_multiple_of``. The first label of every example is -100, so no token learns to predict the start of
    the next example; the loss is the same mean over the same target tokens as the padded batch's.

    The rounding keeps the number of distinct batch shapes small. On a GPU every new (batch, length) shape costs:
    torch's cuDNN attention builds an execution plan per shape (tenths of a second, forward and backward), and the
    memory allocator and kernel choices start over; rows of a few fixed widths are paid for once."""
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of}: must be >= 1")

    def round_up(length: int) -> int:
        return -(-length // pad_to_multiple_of) * pad_to_multiple_of

    def positions(example: dict) -> list[int]:
        return list(example["position_ids"]) if "position_ids" in example else list(range(len(example["input_ids"])))

    def collate_flat(examples: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, position_ids = [], [], []
        for example in examples:
            where = positions(example)
            ids += example["input_ids"]
            labels += [IGNORE_INDEX if p == 0 else label for p, label in zip(where, example["labels"])]
            position_ids += where
        real, width = len(ids), round_up(len(ids))
        pad = width - real  # one pad segment at the end, positions of its own, no labels
        position_ids += list(range(pad))
        starts = [i for i, p in enumerate(position_ids) if p == 0] + [width]
        bounds = torch.tensor(starts, dtype=torch.int32)
        longest = max(b - a for a, b in zip(starts[:-1], starts[1:]))
        # The examples' boundaries under transformers' flash-attention names: recipes/packed_attention.py reads them.
        return {"input_ids": torch.tensor([ids + [pad_token_id] * pad]),
                "labels": torch.tensor([labels + [IGNORE_INDEX] * pad]),
                "attention_mask": torch.tensor([[1] * real + [0] * pad]),
                "position_ids": torch.tensor([position_ids]),
                "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}

    def collate_padded(examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        width = round_up(longest)
        if max_length is not None:
            width = max(longest, min(width, max_length))

        def pad(values: list[list[int]], value: int) -> torch.Tensor:
            return torch.tensor([list(v) + [value] * (width - len(v)) for v in values], dtype=torch.long)
        batch = {"input_ids": pad([e["input_ids"] for e in examples], pad_token_id),
                 "labels": pad([e["labels"] for e in examples], IGNORE_INDEX),
                 "attention_mask": pad([e["attention_mask"] for e in examples], 0)}
        if "position_ids" in examples[0]:  # packed rows: pads continue the last example's positions
            def continued(positions: list[int]) -> list[int]:
                return list(positions) + list(range(positions[-1] + 1, positions[-1] + 1 + width - len(positions)))
            batch["position_ids"] = torch.tensor([continued(e["position_ids"]) for e in examples], dtype=torch.long)
        return batch
    return collate_flat if padding_free else collate_padded


def pad_multiple(data_cfg, device: torch.device) -> int:
    """data.pad_to_multiple_of, with ``auto`` = 64 on a GPU (few shapes) and 1 on a CPU (no shape costs there,
    and every padded token is computed)."""
    value = str(data_cfg.get("pad_to_multiple_of", "auto"))
    if value == "auto":
        return 64 if device.type == "cuda" else 1
    try:
        value = int(value)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise DataError(f"data.pad_to_multiple_of={data_cfg.pad_to_multiple_of!r}: give auto or a whole number >= 1")
    return value
