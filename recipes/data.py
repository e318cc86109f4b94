"""Instruction-tuning data: alpaca and chat records from local JSON/JSONL, validated, tokenized with the prompt
masked out of the loss, optionally packed, split into train/eval.

Every record is checked before anything is tokenized, and a bad one is reported as ``file line N: field ...``
with the fix, so a malformed dataset fails in seconds, not mid-training.

Formats (auto-detected per record):
  alpaca  {"instruction": str, "input": str (optional), "output": str, ...}
  chat    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

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

import bisect
import json
from pathlib import Path

import datasets
import torch

ROOT = Path(__file__).resolve().parents[1]
IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)

# The Stanford-alpaca prompt, the layout the LLM-Adapters data (and most alpaca-style sets) were built for.
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file or record the pipeline cannot use; the message names the file, line and field."""


def resolve_path(path: str) -> Path:
    """A data path as given (relative to the working directory) or relative to the repository root."""
    for candidate in (Path(path), ROOT / path):
        if candidate.is_file():
            return candidate
    raise DataError(f"data file {path!r} not found (looked in {Path.cwd()} and {ROOT}); "
                    "fix data.train_files / data.eval_files")


def format_prompt(record: dict) -> str:
    """The alpaca prompt of a record, without its answer (also used to prompt generation at eval time)."""
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


# ----- reading and validation ------------------------------------------------------------------------------------
def _raw_records(path: Path) -> list[tuple[str, object]]:
    """(location, parsed JSON value) for each record of a .jsonl (one per line) or .json (a list) file."""
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: not JSON/JSONL ({path.suffix or 'no extension'}); data files are .json (one list "
                        "of records) or .jsonl (one record per line); convert it, e.g. with pandas' to_json")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                                "each line of a .jsonl file must be one JSON object") from None
        return out
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); a .json data file holds "
                        "one list of records (use .jsonl for one record per line)") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: a .json data file must hold a list of records, found {type(value).__name__}")
    return [(f"{path} record {index}", record) for index, record in enumerate(value)]


def _check_alpaca(where: str, record: dict) -> dict:
    for field, required in (("instruction", True), ("output", True), ("input", False)):
        if field not in record:
            if required:
                raise DataError(f"{where}: field {field!r} is missing; each alpaca record needs "
                                "'instruction' and 'output' (and an optional 'input')")
            continue
        if not isinstance(record[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, found {type(record[field]).__name__}")
    if not record["output"].strip():
        raise DataError(f"{where}: field 'output' is empty; there is nothing to learn from this record")
    # The gold ``answer`` (LLM-Adapters' label or number) is kept for evaluation; training ignores it.
    answer = record.get("answer")
    return {"instruction": record["instruction"], "input": record.get("input", ""), "output": record["output"],
            "answer": "" if answer is None else str(answer)}


def _check_chat(where: str, record: dict) -> dict:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: field 'messages[{index}]' needs 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: field 'messages[{index}].role' is {message['role']!r}; use one of {ROLES}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: field 'messages[{index}].content' must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field 'messages' has no assistant turn; there is nothing to learn from it")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def load_records(path: str, format: str = "auto") -> datasets.Dataset:
    """Validated records of one file as a `datasets.Dataset` (alpaca columns, or ``messages`` for chat),
    plus a ``source`` column ("file line N") used in later error messages."""
    if format not in ("auto", "alpaca", "chat"):
        raise DataError(f"data.format={format!r}: choose auto, alpaca or chat")
    resolved = resolve_path(path)
    rows, kinds = [], set()
    for where, record in _raw_records(resolved):
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, found {type(record).__name__}")
        kind = format if format != "auto" else ("chat" if "messages" in record else "alpaca")
        if kind == "chat" and "messages" not in record:
            raise DataError(f"{where}: field 'messages' is missing (data.format=chat)")
        checked = _check_chat(where, record) if kind == "chat" else _check_alpaca(where, record)
        rows.append({**checked, "source": where})
        kinds.add(kind)
    if not rows:
        raise DataError(f"{resolved} holds no records; point data.train_files at a non-empty file")
    if len(kinds) > 1:
        raise DataError(f"{resolved} mixes alpaca and chat records; keep one format per file")
    return datasets.Dataset.from_list(rows)


# ----- tokenization ------------------------------------------------------------------------------------------------
def _segments(record: dict, tokenizer) -> list[tuple[str, bool]]:
    """(text, is_learned) pieces of a record, in order; learned pieces are the answer / assistant turns."""
    if "messages" not in record or record["messages"] is None:
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
                raise DataError(f"{record.get('source', 'a chat record')}: the tokenizer's chat template renders "
                                "earlier turns differently once a later turn is added, so the answer cannot be "
                                "masked; use a template that only appends (or data.format=alpaca)")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
    return pieces


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts a text with BOS (its own convention, e.g. LLaMA's add_bos_token)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def encode_record(record: dict, tokenizer, mask_prompt: bool = True) -> tuple[list[int], list[int], int | None]:
    """(input_ids, labels, index of the first learned token) of one record, untruncated. Prompt tokens get label
    -100 when ``mask_prompt``; each answer ends with EOS exactly once. The one place a record becomes tokens: the
    recipe's training data, and evaluation's prompts and scored answers (recipes/inference.py)."""
    pieces = _segments(record, tokenizer)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    starts_with_bos = bool(bos) and pieces[0][0].startswith(bos)
    ids = [tokenizer.bos_token_id] if _adds_bos(tokenizer) and not starts_with_bos else []
    labels = [IGNORE_INDEX] * len(ids)
    first_learned = None
    for text, learned in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if learned and not (eos and eos in text):
            piece = piece + [tokenizer.eos_token_id]
        if learned and first_learned is None:
            first_learned = len(ids)
        ids += piece
        labels += piece if (learned or not mask_prompt) else [IGNORE_INDEX] * len(piece)
    return ids, labels, first_learned


def encode_prompt(record: dict, tokenizer) -> list[int]:
    """Token ids of a record's prompt, exactly as training sees them before the first answer token (what a
    model is given to generate the answer)."""
    ids, _, first_learned = encode_record(record, tokenizer)
    return ids[:first_learned]


def tokenize_records(ds: datasets.Dataset, tokenizer, max_length: int, mask_prompt: bool = True) -> datasets.Dataset:
    """input_ids / labels / attention_mask per record (see `encode_record`), cut to ``max_length``. A record
    whose prompt alone fills ``max_length`` is an error, reported up front."""
    def encode(record: dict) -> dict:
        ids, labels, first_learned = encode_record(record, tokenizer, mask_prompt)
        if first_learned is None or first_learned >= max_length:
            raise DataError(f"{record['source']}: the prompt takes {first_learned} tokens but data.max_length="
                            f"{max_length} leaves no room for the answer; raise data.max_length or shorten the record")
        ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}

    return ds.map(encode, remove_columns=ds.column_names)


def pack_sequences(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Best-fit-decreasing packing: examples, longest first, each go into the fullest row that still has room for
    them (a new row when none has), rows of at most ``max_length`` tokens; an example never straddles two rows.
    Rows come out as full as the lengths allow (greedy packing of consecutive examples leaves the gap before every
    example that did not fit): on the default data 70% full at 256 tokens (most records are over half of that) and
    96% at 1024, against 62% and less for greedy packing. Each row carries ``position_ids`` that restart at 0 for
    every example: the model then keeps attention inside each example (transformers builds a block-diagonal
    causal mask from restarting positions) and each example sees the positions it would see alone.
    Deterministic: ties keep the dataset's order."""
    lengths = [len(ids) for ids in ds["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    shortest = min(lengths, default=0)
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row) of the rows that can still take something, sorted
    for index in order:
        slot = bisect.bisect_left(room, (lengths[index], -1))  # the row with the least room that is enough
        if slot == len(room):
            rows.append([index])
            free, row = max_length - lengths[index], len(rows) - 1
        else:
            free, row = room.pop(slot)
            rows[row].append(index)
            free -= lengths[index]
        if free >= shortest:  # a row no example can still fit in leaves the search list (keeps it short)
            bisect.insort(room, (free, row))
    columns = ds.select_columns(["input_ids", "labels", "attention_mask"]).to_dict()
    columns["position_ids"] = [list(range(n)) for n in lengths]
    return datasets.Dataset.from_dict({key: [[token for i in row for token in values[i]] for row in rows]
                                       for key, values in columns.items()})


def train_eval_split(ds: datasets.Dataset, eval_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Deterministic split; eval gets at least one record."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction={eval_fraction}: must be in (0, 1), or give data.eval_files")
    if len(ds) < 2:
        raise DataError(f"only {len(ds)} record(s): too few to split off an eval set; give data.eval_files")
    parts = ds.train_test_split(test_size=max(1, round(eval_fraction * len(ds))), seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _load_tokenized(files, data_cfg, tokenizer) -> datasets.Dataset | None:
    parts = [tokenize_records(load_records(f, data_cfg.format), tokenizer, int(data_cfg.max_length),
                              bool(data_cfg.mask_prompt)) for f in files]
    return datasets.concatenate_datasets(parts) if parts else None


def _limit(ds: datasets.Dataset, limit, seed: int) -> datasets.Dataset:
    return ds.shuffle(seed=seed).select(range(min(int(limit), len(ds)))) if limit else ds


def build_datasets(data_cfg, tokenizer, seed: int, micro_batch_size: int = 1
                   ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval) tokenized datasets as ``data_cfg`` (the recipe's ``data`` section) describes.

    With ``data.padding_free`` the training examples are packed into rows of ``micro_batch_size x max_length``
    tokens (best fit, attention kept inside each example), one row per micro-batch: a step sees as many tokens
    as a full padded batch would hold, with almost none of them padding."""
    datasets.disable_progress_bars()  # small local files: the bars only clutter the log
    if not data_cfg.train_files:
        raise DataError("data.train_files is empty; name at least one alpaca or chat JSON/JSONL file")
    for path in list(data_cfg.train_files) + list(data_cfg.eval_files or []):
        resolve_path(path)  # every missing path is reported before any tokenizing
    train = _load_tokenized(list(data_cfg.train_files), data_cfg, tokenizer)
    if data_cfg.eval_files:
        evaluation = _load_tokenized(list(data_cfg.eval_files), data_cfg, tokenizer)
    elif data_cfg.eval_fraction:
        train, evaluation = train_eval_split(train, float(data_cfg.eval_fraction), seed)
    else:
        evaluation = None
    train = _limit(train, data_cfg.max_train_records, seed)
    if evaluation is not None:
        evaluation = _limit(evaluation, data_cfg.max_eval_records, seed)
    if data_cfg.get("padding_free", False):
        train = pack_sequences(train, micro_batch_size * int(data_cfg.max_length))
    elif data_cfg.packing:
        train = pack_sequences(train, int(data_cfg.max_length))
    if len(train) == 0:
        raise DataError("the training set is empty after filtering; check data.max_train_records")
    return train, evaluation


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
