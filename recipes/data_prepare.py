"""The data a run trains on, prepared once: sources -> checked records -> the mix -> tokens (masks) -> split, limit,
packing -> Arrow on disk -> memory-mapped by every rank.

The prepared data set is cached in ``$SELORA_CACHE/data`` (else ``$XDG_CACHE_HOME/selora/data``, else
``~/.cache/selora/data``) under a key of everything that determines it: the sources' content (sha256 of each file or
save_to_disk folder, a hub data set's cached files), their formats and field mappings, the tokenizer (its
vocabulary, rules and special tokens) and chat template, max length, masking, packing mode, the mix and caps, the
split and limits, and the seed. Local rank 0 of each node builds a missing entry (recipes/shared_build.py) while
the other ranks wait; a second run with the same data starts without reading or tokenizing anything.
``python launch/prepare_data.py --recipe NAME`` builds it ahead of a cluster job and prints `report_lines`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

from recipes.data import (IGNORE_INDEX, _adds_bos, limit_records, pack_sequences, tokenize_records,
                          train_eval_split)
from recipes.data_mix import choose_records
from recipes.data_sources import DataError, Source, locate, fingerprint, location, records_of, sources_from
from recipes.shared_build import BuildFailed, BuildUnavailable, build_once

CACHE_FORMAT = 1  # bump when the same inputs would give other tokens or another layout on disk
HELPER_COLUMNS = ["source_id", "full_length"]


@dataclass
class Prepared:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    report: dict
    entry: Path
    built: bool  # this process tokenized it (False: read from the cache)


def cache_root() -> Path:
    if os.environ.get("SELORA_CACHE"):
        return Path(os.environ["SELORA_CACHE"]) / "data"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "selora" / "data"


def check_data_config(data_cfg) -> tuple[list[Source], list[Source]]:
    """The data.* keys that need no file read: sources (paths, formats, fields, weights, caps), mix_records,
    num_proc. Raises DataError naming the key and the fix."""
    train = sources_from(data_cfg.train_files, data_cfg, "train_files")
    evaluation = sources_from(data_cfg.eval_files, data_cfg, "eval_files")
    if not train:
        raise DataError("data.train_files is empty; name at least one data file, save_to_disk folder or hub data set")
    mix = data_cfg.get("mix_records")
    if mix is not None:
        if mix < 1:
            raise DataError(f"data.mix_records={mix}: must be a whole number >= 1 (or null: as many as the sources allow)")
        if train[0].weight is None:
            raise DataError(f"data.mix_records={mix} has no mix to size: give the training sources weights, e.g. "
                            "data.train_files=[{path: a.jsonl, weight: 3}, {path: b.jsonl, weight: 1}]")
    num_proc(data_cfg, 0)
    return train, evaluation


def num_proc(data_cfg, records: int) -> int:
    """data.num_proc: a number, or auto = every core this process may use (at most 16) for 50k records or more,
    else 1 (starting workers costs more than it saves on small sets)."""
    value = str(data_cfg.get("num_proc", "auto"))
    if value == "auto":
        return min(len(os.sched_getaffinity(0)), 16) if records >= 50_000 else 1
    if not value.isdigit() or int(value) < 1:
        raise DataError(f"data.num_proc={data_cfg.num_proc!r}: give auto or a whole number >= 1 (processes that "
                        "tokenize)")
    return int(value)


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the tokenizer's ids: its rules and vocabulary (the fast tokenizer's JSON), special tokens, BOS
    convention and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer)
    parts = [type(tokenizer).__name__, rules, str(getattr(tokenizer, "chat_template", None)),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str), str(_adds_bos(tokenizer))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(train: list[Source], evaluation: list[Source], data_cfg, tokenizer, seed: int,
              micro_batch_size: int) -> dict:
    import tokenizers
    return {"cache_format": CACHE_FORMAT, "tokenizers": tokenizers.__version__,
            "train": [[asdict(s), fingerprint(s)] for s in train],
            "eval": [[asdict(s), fingerprint(s)] for s in evaluation],
            "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": int(data_cfg.max_length),
            "mask_prompt": bool(data_cfg.mask_prompt), "packing": bool(data_cfg.packing),
            "padding_free": bool(data_cfg.get("padding_free", False)),
            "micro_batch_size": int(micro_batch_size) if data_cfg.get("padding_free", False) else None,
            "eval_fraction": None if evaluation else data_cfg.eval_fraction,
            "max_train_records": data_cfg.max_train_records, "max_eval_records": data_cfg.max_eval_records,
            "mix_records": data_cfg.get("mix_records"), "seed": int(seed)}


def prepare(data_cfg, tokenizer, seed: int, micro_batch_size: int = 1) -> Prepared:
    """The prepared (train, eval) data sets as ``data_cfg`` describes, from the cache or built into it."""
    datasets.disable_progress_bars()
    train_sources, eval_sources = check_data_config(data_cfg)
    for source in train_sources + eval_sources:
        locate(source)  # every missing path is reported before anything is read
    key = cache_key(train_sources, eval_sources, data_cfg, tokenizer, seed, micro_batch_size)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    entry = cache_root() / digest
    built = []

    def build(staging: Path) -> None:
        built.append(True)
        build_entry(staging, train_sources, eval_sources, data_cfg, tokenizer, seed, micro_batch_size)
        (staging / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True, default=str) + "\n")

    try:
        build_once(entry, build, what="the tokenized data set", required=("train/state.json", "report.json"))
    except BuildUnavailable as error:
        raise DataError(f"the data cache cannot be written ({error}); point SELORA_CACHE at a writable folder") from None
    except BuildFailed as error:  # on the ranks that waited: the builder reported the cause in its own error line
        raise DataError(f"{error}") from None
    train = datasets.load_from_disk(str(entry / "train"))
    evaluation = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    return Prepared(train, evaluation, json.loads((entry / "report.json").read_text()), entry, bool(built))


def build_datasets(data_cfg, tokenizer, seed: int, micro_batch_size: int = 1
                   ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval) tokenized datasets as ``data_cfg`` (the recipe's ``data`` section) describes, memory-mapped
    from the cache (`prepare`); global rank 0 prints each source's records and tokens.

    With ``data.padding_free`` the training examples are packed into rows of ``micro_batch_size x max_length``
    tokens (best fit, attention kept inside each example), one row per micro-batch: a step sees as many tokens
    as a full padded batch would hold, with almost none of them padding."""
    prepared = prepare(data_cfg, tokenizer, seed, micro_batch_size)
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(report_lines(prepared, full=False)), flush=True)
    if len(prepared.train) == 0:
        raise DataError("the training set is empty after filtering; check data.max_train_records")
    return prepared.train, prepared.eval


# ----- building an entry ---------------------------------------------------------------------------------------------
def _tokenized(sources: list[Source], data_cfg, tokenizer, seed: int, work: Path, name: str, mix: bool
               ) -> tuple[datasets.Dataset, list[dict]]:
    parts, formats = [], []
    for source_id, source in enumerate(sources):
        records, fmt = records_of(source, source_id, work / name, lambda n: num_proc(data_cfg, n))
        parts.append(records)
        formats.append(fmt)
    sizes = [len(p) for p in parts]
    chosen = choose_records(sizes, [s.weight for s in sources], [s.max_records for s in sources],
                            data_cfg.get("mix_records"), seed) if mix else None
    if chosen is not None:
        parts = [p.select(rows.tolist(), indices_cache_file_name=str(work / name / f"chosen-{i}.arrow"))
                 for i, (p, rows) in enumerate(zip(parts, chosen))]
    records = datasets.concatenate_datasets(parts)
    tokens = tokenize_records(records, tokenizer, int(data_cfg.max_length), bool(data_cfg.mask_prompt),
                              num_proc=num_proc(data_cfg, len(records)),
                              cache_file_name=str(work / name / "tokens.arrow"),
                              where=lambda row: location(sources[row["source_id"]], row["row"]))
    per_source = _per_source(tokens, len(sources), int(data_cfg.max_length))
    for source, fmt, size, stats, rows in zip(sources, formats, sizes, per_source, chosen or [None] * len(sources)):
        stats.update(path=source.path, format=fmt, records=size,
                     repeated=0 if rows is None else int(len(rows) - len(np.unique(rows))))
    return tokens, per_source


def _per_source(tokens: datasets.Dataset, count: int, max_length: int) -> list[dict]:
    table = tokens.select_columns(HELPER_COLUMNS).with_format("arrow")[:]
    source = table["source_id"].to_numpy()
    full = table["full_length"].to_numpy()
    kept = np.minimum(full, max_length)
    return [{"used": int((source == i).sum()), "tokens": int(kept[source == i].sum()),
             "cut": int((full[source == i] > max_length).sum()),
             "tokens_cut": int((full[source == i] - kept[source == i]).sum())} for i in range(count)]


def build_entry(staging: Path, train_sources, eval_sources, data_cfg, tokenizer, seed: int,
                micro_batch_size: int) -> None:
    """Fill ``staging`` with train/ (and eval/) as save_to_disk folders and report.json."""
    work = staging / "work"
    max_length = int(data_cfg.max_length)
    try:
        train, train_stats = _tokenized(train_sources, data_cfg, tokenizer, seed, work, "train", mix=True)
        eval_stats, evaluation = [], None
        if eval_sources:
            evaluation, eval_stats = _tokenized(eval_sources, data_cfg, tokenizer, seed, work, "eval", mix=False)
        elif data_cfg.eval_fraction:
            train, evaluation = train_eval_split(train, float(data_cfg.eval_fraction), seed)
        held_out = 0 if eval_sources or evaluation is None else len(evaluation)
        after_split = len(train)
        train = limit_records(train, data_cfg.max_train_records, seed)
        if evaluation is not None:
            evaluation = limit_records(evaluation, data_cfg.max_eval_records, seed)
        report = {"max_length": max_length, "sources": train_stats, "eval_sources": eval_stats,
                  "held_out_for_eval": held_out,
                  "over_max_train_records": after_split - len(train), "train_examples": len(train),
                  "eval_examples": 0 if evaluation is None else len(evaluation),
                  "lengths": _length_distribution(train, max_length),
                  "example": _example(train, tokenizer) if len(train) else []}
        plain = train.remove_columns(HELPER_COLUMNS)
        if data_cfg.get("padding_free", False):
            train = pack_sequences(plain, micro_batch_size * max_length, str(work / "packed.arrow"))
        elif data_cfg.packing:
            train = pack_sequences(plain, max_length, str(work / "packed.arrow"))
        else:
            train = plain
        report["train_rows"] = len(train)
        if train is not plain:
            width = micro_batch_size * max_length if data_cfg.get("padding_free", False) else max_length
            report["row_fill"] = report["lengths"]["total_tokens"] / max(1, len(train) * width)
        train.save_to_disk(str(staging / "train"))
        if evaluation is not None:
            evaluation.remove_columns(HELPER_COLUMNS).save_to_disk(str(staging / "eval"))
        (staging / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _length_distribution(train: datasets.Dataset, max_length: int) -> dict:
    table = train.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
    if len(lengths) == 0:
        return {"total_tokens": 0, "learned_tokens": 0}
    # Counted in Arrow: a numpy copy of every label would cost memory in proportion to the data set.
    learned = pc.sum(pc.not_equal(pc.list_flatten(table["labels"]), IGNORE_INDEX)).as_py() or 0
    edges = np.linspace(0, max_length, 9).astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    return {"total_tokens": int(lengths.sum()), "learned_tokens": int(learned),
            "min": int(lengths.min()), "p50": int(np.percentile(lengths, 50)), "p90": int(np.percentile(lengths, 90)),
            "p99": int(np.percentile(lengths, 99)), "max": int(lengths.max()),
            "histogram": [[int(a), int(b), int(c)] for a, b, c in zip(edges[:-1], edges[1:], counts)]}


def _example(train: datasets.Dataset, tokenizer) -> list[list]:
    """The first training example as [text, learned] runs of tokens."""
    row = train[0]
    runs: list[list] = []
    for token, label in zip(row["input_ids"], row["labels"]):
        learned = label != IGNORE_INDEX
        if runs and runs[-1][1] == learned:
            runs[-1][0].append(token)
        else:
            runs.append([[token], learned])
    return [[tokenizer.decode(ids), learned] for ids, learned in runs]


# ----- what a run will see ---------------------------------------------------------------------------------------
def report_lines(prepared: Prepared, full: bool = True) -> list[str]:
    """The start-of-run summary (full=False: one line per source and one for the whole), or everything the prepare
    command prints: length distribution, what was dropped or cut and why, one example with its masked tokens."""
    report = prepared.report
    lines = []
    for stats in report["sources"]:
        lines.append(f"data: {stats['path']} ({stats['format']}): {stats['used']:,} of {stats['records']:,} records"
                     + (f" ({stats['repeated']:,} repeated)" if stats["repeated"] else "")
                     + f", {stats['tokens']:,} tokens" + (f", {stats['cut']:,} cut to max_length" if stats["cut"] else ""))
    packed = f" in {report['train_rows']:,} packed rows ({report['row_fill']:.0%} full)" if "row_fill" in report else ""
    lines.append(f"data: {report['train_examples']:,} training examples{packed}, {report['eval_examples']:,} eval; "
                 f"{'tokenized into' if prepared.built else 'read from'} {prepared.entry}")
    if not full:
        return lines
    lengths = report["lengths"]
    if "min" in lengths:
        lines.append(f"lengths (tokens per example): min {lengths['min']}, median {lengths['p50']}, 90% "
                     f"{lengths['p90']}, 99% {lengths['p99']}, max {lengths['max']}; {lengths['total_tokens']:,} "
                     f"tokens, {lengths['learned_tokens']:,} learned")
        top = max(c for _, _, c in lengths["histogram"]) or 1
        for low, high, count in lengths["histogram"]:
            lines.append(f"  {low:>6}-{high:<6} {count:>10,} {'#' * round(40 * count / top)}")
    not_drawn = sum(s["records"] - s["used"] + s["repeated"] for s in report["sources"])
    cut = sum(s["cut"] for s in report["sources"])
    lines.append(f"dropped: {not_drawn:,} records not drawn (source max_records / weights), "
                 f"{report['held_out_for_eval']:,} held out for eval (data.eval_fraction), "
                 f"{report['over_max_train_records']:,} over data.max_train_records")
    lines.append(f"cut: {cut:,} records longer than data.max_length={report['max_length']} lost "
                 f"{sum(s['tokens_cut'] for s in report['sources']):,} tokens at their end")
    lines.append("example (first training example; masked tokens, which carry no loss, inside [[...]]):")
    lines.append("".join(text if learned else f"[[{text}]]" for text, learned in report["example"]))
    return lines
