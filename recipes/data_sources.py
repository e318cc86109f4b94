"""Where instruction-tuning records come from and what shape they must have: the sources a recipe names, read with
`datasets` (Arrow, memory-mapped), each record checked and brought to one layout.

A source is a file (.json, .jsonl, .parquet, .csv), a folder written by ``datasets.save_to_disk``, or the name of a
Hugging Face hub data set that is in the local ``datasets`` cache (nothing is downloaded). In a recipe a source is a
path or name, or a mapping ``{path, format, fields, weight, max_records, split}`` (see configs/defaults.yaml).

Formats (``auto`` tells them apart by their fields):
  alpaca    {"instruction", "input" (optional), "output"}                  loss on the output
  chat      {"messages": [{"role": system|user|assistant, "content"}]}     loss on every assistant turn
  sharegpt  {"conversations": [{"from": system|human|gpt, "value"}]}       the same as chat
  text      {"text"}                                                       loss on every token (no prompt)
``fields`` maps these names to a data set's own ones, e.g. ``{instruction: prompt, output: completion}`` or
``{conversations: dialog, from: speaker, value: text, human: user, gpt: bot}``.

Every record becomes one row of `RECORD_FEATURES` (the unused layouts' columns null); a bad one is reported as
``file line N: field ...`` (JSONL), ``file record N`` (a JSON list) or ``source row N`` (the others, counted from 0
as datasets indexes them).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from recipes.config_files import ROOT  # relative paths such as configs/data/x.jsonl resolve under it
FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text")
SOURCE_KEYS = ("path", "format", "fields", "weight", "max_records", "split")
ROLES = ("system", "user", "assistant")
# Each format's field names, by their canonical name (what ``fields`` may rename).
FIELDS = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "answer": "answer"},
    "chat": {"messages": "messages", "role": "role", "content": "content",
             "system": "system", "user": "user", "assistant": "assistant"},
    "sharegpt": {"conversations": "conversations", "from": "from", "value": "value",
                 "system": "system", "human": "human", "gpt": "gpt"},
    "text": {"text": "text"},
}
MARKER = {"alpaca": "instruction", "chat": "messages", "sharegpt": "conversations", "text": "text"}
RECORD_FEATURES = datasets.Features({
    "instruction": datasets.Value("string"), "input": datasets.Value("string"), "output": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "text": datasets.Value("string"),
    "source_id": datasets.Value("int32"), "row": datasets.Value("int64")})


class DataError(ValueError):
    """A data file or record the pipeline cannot use; the message names the file, line and field."""


class RecordProblem(ValueError):
    """What is wrong with one record (row ``row`` of source ``source_id``); the caller adds where it is."""

    def __init__(self, source_id: int, row: int, message: str):
        super().__init__(source_id, row, message)
        self.source_id, self.row, self.message = source_id, row, message


@dataclass(frozen=True)
class Source:
    """One entry of data.train_files / data.eval_files, checked."""
    path: str
    format: str = "auto"
    fields: dict = field(default_factory=dict)
    weight: float | None = None
    max_records: int | None = None
    split: str = "train"


def sources_from(entries, data_cfg, key: str) -> list[Source]:
    """The checked sources of ``data.<key>`` (entries are a path/name or a mapping); one error names a bad one."""
    default_format = str(data_cfg.get("format", "auto"))
    default_fields = dict(data_cfg.get("fields") or {})
    sources = []
    for index, entry in enumerate(entries or []):
        where = f"data.{key}[{index}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        elif hasattr(entry, "items"):
            entry = {k: (dict(v) if hasattr(v, "items") else v) for k, v in entry.items()}
        else:
            raise DataError(f"{where}={entry!r}: give a path, a hub data set name, or a mapping with keys "
                            f"{', '.join(SOURCE_KEYS)}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise DataError(f"{where}: unknown key {unknown[0]!r}; a source takes {', '.join(SOURCE_KEYS)}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise DataError(f"{where}: 'path' is missing; name a file, a save_to_disk folder or a hub data set")
        source = Source(path=entry["path"], format=str(entry.get("format") or default_format),
                        fields=dict(entry.get("fields") or default_fields), weight=entry.get("weight"),
                        max_records=entry.get("max_records"), split=str(entry.get("split") or "train"))
        check_source(source, where, key)
        sources.append(source)
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise DataError(f"data.{key}: some sources have a weight and some not; give every source a weight "
                        "(the share of the mix it makes up) or none")
    return sources


def check_source(source: Source, where: str, key: str) -> None:
    if source.format not in FORMATS:
        raise DataError(f"{where}: format={source.format!r}; choose one of {', '.join(FORMATS)}")
    known = set().union(*FIELDS.values()) if source.format == "auto" else set(FIELDS[source.format])
    for name, value in source.fields.items():
        if name not in known:
            raise DataError(f"{where}: fields.{name} is not a field of format {source.format}; it maps one of "
                            f"{', '.join(sorted(known))} to your data's name")
        if not isinstance(value, str) or not value:
            raise DataError(f"{where}: fields.{name}={value!r} must be the name of a field in your data")
    if source.weight is not None:
        if key != "train_files":
            raise DataError(f"{where}: weight is for mixing training sources; remove it from data.{key}")
        if isinstance(source.weight, bool) or not isinstance(source.weight, (int, float)) or not source.weight > 0:
            raise DataError(f"{where}: weight={source.weight!r} must be a number > 0 (the source's share of the mix)")
    if source.max_records is not None and (isinstance(source.max_records, bool) or not isinstance(
            source.max_records, int) or source.max_records < 1):
        raise DataError(f"{where}: max_records={source.max_records!r} must be a whole number >= 1 (or null)")


# ----- where a source is -------------------------------------------------------------------------------------------
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def locate(source: Source) -> tuple[str, object]:
    """("file", Path) | ("folder", Path) | ("hub", name); a missing file is an error."""
    for candidate in (Path(source.path), ROOT / source.path):
        if candidate.is_file():
            if candidate.suffix not in FILE_TYPES:
                raise DataError(f"{candidate}: not a data file type selora reads ({candidate.suffix or 'no extension'}); "
                                "give .json, .jsonl, .parquet or .csv, or a folder written by datasets' save_to_disk")
            return "file", candidate
        if candidate.is_dir():
            return "folder", candidate
    if Path(source.path).suffix in FILE_TYPES or not HUB_NAME.fullmatch(source.path):
        raise DataError(f"data file {source.path!r} not found (looked in {Path.cwd()} and {ROOT}); "
                        "fix data.train_files / data.eval_files")
    return "hub", source.path


def fingerprint(source: Source) -> str:
    """What determines the source's records: the file's or folder's content (sha256), or a hub data set's cached
    files (immutable per version: their names and sizes)."""
    kind, where = locate(source)
    digest = hashlib.sha256(f"{kind}|{source}".encode())
    if kind == "hub":
        for item in sorted(_hub_dataset(source).cache_files, key=lambda f: f["filename"]):
            digest.update(f"{item['filename']}|{os.path.getsize(item['filename'])}".encode())
        return digest.hexdigest()
    files = [where] if kind == "file" else sorted(p for p in where.rglob("*") if p.is_file())
    for path in files:
        digest.update(str(path.relative_to(where) if kind == "folder" else path.name).encode())
        with open(path, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


# ----- reading -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _offline():
    """datasets resolves a hub name from its local cache only, however the environment is set."""
    import huggingface_hub.constants as hub
    before = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = before


def _hub_dataset(source: Source) -> datasets.Dataset:
    try:
        with _offline():
            return datasets.load_dataset(source.path, split=source.split)
    except Exception as error:  # noqa: BLE001 - datasets raises several kinds for "not cached"
        raise DataError(f"data source {source.path!r} is not a file or folder here and not in the local datasets "
                        f"cache ({datasets.config.HF_DATASETS_CACHE}: {type(error).__name__}); nothing is downloaded "
                        f"during a run: on a machine with internet run python -c \"import datasets; "
                        f"datasets.load_dataset('{source.path}')\" with the same HF_HOME, or save it with "
                        f"save_to_disk and give that folder") from None


def read_raw(source: Source, work: Path) -> datasets.Dataset:
    """The source's rows as datasets reads them (Arrow on disk under ``work``, memory-mapped)."""
    kind, where = locate(source)
    if kind == "hub":
        return _hub_dataset(source)
    if kind == "folder":
        try:
            loaded = datasets.load_from_disk(str(where))
        except FileNotFoundError:
            raise DataError(f"{where}: a folder, but not one written by datasets' save_to_disk (no dataset_info.json"
                            " / state.json); give a data file or a save_to_disk folder") from None
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise DataError(f"{where}: no split {source.split!r} (it has {', '.join(loaded)}); set the source's "
                                "split, e.g. {path: ..., split: " + next(iter(loaded)) + "}")
            loaded = loaded[source.split]
        return loaded
    builder = FILE_TYPES[where.suffix]
    if builder == "json" and _blank(where):
        raise DataError(f"{where} holds no records; point data.train_files at a non-empty file")
    if where.suffix == ".jsonl" and _first_character(where) != "{":  # datasets would read "[1, 2]" as a text column
        for where_, record in _json_records(where):
            if not isinstance(record, dict):
                raise DataError(f"{where_}: a record must be a JSON object, found {type(record).__name__}")
    options = {}
    if builder == "csv":  # every column as text: "007" and "0.50" stay what they are
        with open(where, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        return datasets.load_dataset(builder, data_files=str(where), split="train", cache_dir=str(work / "hf"),
                                     **options)
    except Exception as error:  # noqa: BLE001 - find the record pyarrow stopped at, with its line
        if builder == "json":
            for where_, record in _json_records(where):
                if not isinstance(record, dict):
                    raise DataError(f"{where_}: a record must be a JSON object, found {type(record).__name__}") from None
        cause = error.__cause__ or error
        raise DataError(f"{where}: datasets cannot read it ({type(cause).__name__}: {cause}); check the file") from None


def _first_character(path: Path) -> str:
    with open(path, "rb") as handle:
        return handle.read(1 << 16).lstrip()[:1].decode("latin-1")


def _blank(path: Path) -> bool:
    with open(path, "rb") as handle:
        return not handle.read(1 << 16).strip() and path.stat().st_size < (1 << 16)


def _json_records(path: Path):
    """(location, value) of each record of a .jsonl or .json file, parsed by Python: the slow path that names the
    line a parse error is on."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path} line {number}", json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                                    "each line of a .jsonl file must be one JSON object") from None
        return
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); a .json data file holds "
                        "one list of records (use .jsonl for one record per line)") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: a .json data file must hold a list of records, found {type(value).__name__}")
    yield from ((f"{path} record {index}", record) for index, record in enumerate(value))


def location(source: Source, row: int) -> str:
    """Where row ``row`` (counted from 0) of a source is, as a person finds it: a .jsonl line, a .json record."""
    kind, where = locate(source)
    if kind == "file" and where.suffix == ".jsonl":
        with open(where, encoding="utf-8") as handle:
            seen = -1
            for number, line in enumerate(handle, start=1):
                seen += bool(line.strip())
                if seen == row:
                    return f"{where} line {number}"
    if kind == "file" and where.suffix == ".json":
        return f"{where} record {row}"
    return f"{where} row {row}"


def detect_format(source: Source, columns: list[str]) -> str:
    if source.format != "auto":
        return source.format
    found = [fmt for fmt, marker in MARKER.items() if source.fields.get(marker, marker) in columns]
    if len(found) == 1:
        return found[0]
    if {"alpaca", "chat"} <= set(found):
        raise DataError(f"{locate(source)[1]} mixes alpaca and chat records; keep one format per file")
    raise DataError(f"{locate(source)[1]}: cannot tell the format from its fields ({', '.join(columns)}); expected "
                    "instruction/output (alpaca), messages (chat), conversations (sharegpt) or text; set the format "
                    "(data.format or the source's format) or map your names with fields, e.g. "
                    "data.fields.instruction=prompt")


# ----- checking one record -------------------------------------------------------------------------------------------
def check_record(record: dict, fmt: str, fields: dict) -> dict:
    """The record in selora's layout (a row of RECORD_FEATURES without source_id/row); raises ValueError with
    "field ...: what is wrong; the fix" for a record it cannot use."""
    names = {**FIELDS[fmt], **fields}
    if fmt == "alpaca":
        return _check_alpaca(record, names)
    if fmt == "text":
        text = record.get(names["text"])
        if not isinstance(text, str):
            raise ValueError(f"field {names['text']!r} is missing" if text is None else
                             f"field {names['text']!r} must be a string, found {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"field {names['text']!r} is empty; there is nothing to learn from this record")
        return {"text": text}
    return _check_turns(record, fmt, names)


def _check_alpaca(record: dict, names: dict) -> dict:
    out = {}
    for key, required in (("instruction", True), ("output", True), ("input", False)):
        value = record.get(names[key])
        if value is None:
            if required:
                raise ValueError(f"field {names[key]!r} is missing; each alpaca record needs {names['instruction']!r} "
                                 f"and {names['output']!r} (and an optional {names['input']!r})")
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"field {names[key]!r} must be a string, found {type(value).__name__}")
        out[key] = value
    if not out["output"].strip():
        raise ValueError(f"field {names['output']!r} is empty; there is nothing to learn from this record")
    # The gold ``answer`` (LLM-Adapters' label or number) is kept for evaluation; training ignores it.
    answer = record.get(names["answer"])
    out["answer"] = "" if answer is None else str(answer)
    return out


def _check_turns(record: dict, fmt: str, names: dict) -> dict:
    list_key, role_key, content_key = ((names["messages"], names["role"], names["content"]) if fmt == "chat" else
                                       (names["conversations"], names["from"], names["value"]))
    tags = ({names[r]: r for r in ROLES} if fmt == "chat" else
            {names["system"]: "system", names["human"]: "user", names["gpt"]: "assistant"})
    turns = record.get(list_key)
    if turns is None:
        raise ValueError(f"field {list_key!r} is missing (format {fmt})")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"field {list_key!r} must be a non-empty list of {{{role_key}, {content_key}}} objects")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get(role_key) is None or turn.get(content_key) is None:
            raise ValueError(f"field '{list_key}[{index}]' needs {role_key!r} and {content_key!r}")
        if turn[role_key] not in tags:
            raise ValueError(f"field '{list_key}[{index}].{role_key}' is {turn[role_key]!r}; use one of "
                             f"{tuple(tags)}" + ("" if fmt == "chat" else " (or map yours with fields)"))
        if not isinstance(turn[content_key], str):
            raise ValueError(f"field '{list_key}[{index}].{content_key}' must be a string")
        messages.append({"role": tags[turn[role_key]], "content": turn[content_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"field {list_key!r} has no assistant turn; there is nothing to learn from it")
    return {"messages": messages}


EMPTY_RECORD = {name: None for name in RECORD_FEATURES}


def records_of(source: Source, source_id: int, work: Path | None, processes=lambda records: 1
               ) -> tuple[datasets.Dataset, str]:
    """(the checked records of one source as rows of RECORD_FEATURES, its format). On disk under ``work``; in
    memory when ``work`` is None; ``processes(records)`` check it. The first bad record raises DataError naming
    its file and line (or row)."""
    scratch = None
    if work is None:
        scratch = tempfile.TemporaryDirectory(prefix="selora_records_")
        work = Path(scratch.name)
    try:
        raw = read_raw(source, work)
        if len(raw) == 0:
            raise DataError(f"{locate(source)[1]} holds no records; point data.train_files at a non-empty file")
        fmt = detect_format(source, raw.column_names)
        fields = dict(source.fields)

        def canonical(batch: dict, indices: list[int]) -> dict:
            out = {name: [] for name in RECORD_FEATURES}
            keys = list(batch)
            for index, values in zip(indices, zip(*batch.values())):
                try:
                    checked = check_record(dict(zip(keys, values)), fmt, fields)
                except ValueError as problem:
                    raise RecordProblem(source_id, index, str(problem)) from None
                for name, value in {**EMPTY_RECORD, **checked, "source_id": source_id, "row": index}.items():
                    out[name].append(value)
            return out

        work.mkdir(parents=True, exist_ok=True)
        count = processes(len(raw))
        options = (dict(keep_in_memory=True) if scratch else
                   dict(cache_file_name=str(work / f"records-{source_id}.arrow"), num_proc=count if count > 1 else None))
        try:
            return raw.map(canonical, batched=True, with_indices=True, remove_columns=raw.column_names,
                           features=RECORD_FEATURES, desc=f"checking {source.path}", **options), fmt
        except RecordProblem as problem:
            raise DataError(f"{location(source, problem.row)}: {problem.message}") from None
    finally:
        if scratch is not None:
            scratch.cleanup()
