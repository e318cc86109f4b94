"""recipes/data_sources.py, data_mix.py and data_prepare.py: every format and file type gives the tokens and masks of
the equivalent alpaca or messages record; mixing proportions; the cache (reused, rebuilt on any key change, built
once by two racing processes, a poisoned entry rebuilt); new keys and bad sources fail with one message."""
import json
import os
import subprocess
import sys
import textwrap
import time

import datasets
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from recipes import data, data_prepare
from recipes.data_mix import choose_records
from recipes.data_sources import DataError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there?"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye now."}]
SHAREGPT = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in CHAT]
ALPACA = {"instruction": "Add 2 and 3.", "input": "Numbers.", "output": "5"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(data.ROOT / "configs" / "tokenizer"))


def config(train_files, **overrides):
    return OmegaConf.create(dict(train_files=train_files, eval_files=[], format="auto", fields={}, max_length=128,
                                 packing=False, padding_free=False, eval_fraction=None, mask_prompt=True,
                                 max_train_records=None, max_eval_records=None, mix_records=None, num_proc="auto")
                            | overrides)


def write(path, records, kind):
    """``records`` as a file of type ``kind`` (jsonl, json, parquet, csv, folder)."""
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "parquet":
        pd.DataFrame(records).to_parquet(path)
    elif kind == "csv":
        pd.DataFrame(records).to_csv(path, index=False)
    else:
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return str(path)


def tokens(ds):
    return [(row["input_ids"], row["labels"]) for row in ds]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "folder"])
def test_every_format_and_file_type_gives_the_tokens_of_the_equivalent_record(tmp_path, tokenizer, kind):
    suffix = "" if kind == "folder" else f".{kind}"
    renamed = [{"prompt": ALPACA["instruction"], "context": ALPACA["input"], "completion": ALPACA["output"]}]
    cases = [  # (records, source options, the equivalent record data.encode_record takes)
        ([ALPACA], {}, ALPACA),
        (renamed, {"fields": {"instruction": "prompt", "input": "context", "output": "completion"}}, ALPACA),
        ([{"text": "Plain text to continue."}], {}, {"text": "Plain text to continue."}),
    ]
    if kind not in ("csv",):  # CSV holds flat columns only
        cases += [([{"messages": CHAT}], {}, {"messages": CHAT}),
                  ([{"conversations": SHAREGPT}], {}, {"messages": CHAT}),
                  ([{"dialog": [{"speaker": {"human": "user", "gpt": "bot"}.get(t["from"], t["from"]), "text": t["value"]}
                                for t in SHAREGPT]}],
                   {"format": "sharegpt", "fields": {"conversations": "dialog", "from": "speaker", "value": "text",
                                                     "human": "user", "gpt": "bot"}}, {"messages": CHAT})]
    for number, (records, options, equivalent) in enumerate(cases):
        path = write(tmp_path / f"case{number}{suffix}", records, kind)
        train, _ = data_prepare.build_datasets(config([{"path": path, **options}]), tokenizer, seed=0)
        ids, labels, _ = data.encode_record(equivalent, tokenizer)
        assert tokens(train) == [(ids, labels)], (kind, number)
    # the plain-text record is learned whole (no prompt), the ShareGPT system turn is masked like the messages one
    text_ids, text_labels, _ = data.encode_record({"text": "Plain text to continue."}, tokenizer)
    assert text_labels[-1] == tokenizer.eos_token_id and all(l != data.IGNORE_INDEX for l in text_labels[1:])


def test_mixed_sources_have_the_requested_proportions(tmp_path, tokenizer):
    a = write(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(3000)], "jsonl")
    b = write(tmp_path / "b.jsonl", [{"conversations": [{"from": "human", "value": f"b{i}"},
                                                        {"from": "gpt", "value": "y"}]} for i in range(3000)], "jsonl")
    prepared = data_prepare.prepare(config([{"path": a, "weight": 3}, {"path": b, "weight": 1}], mix_records=2000,
                                           max_length=96), tokenizer, seed=1)
    used = [s["used"] for s in prepared.report["sources"]]
    assert sum(used) == len(prepared.train) == 2000
    sigma = np.sqrt(2000 * 0.75 * 0.25)
    assert abs(used[0] - 1500) < 4 * sigma
    # seeded: the same mix again; another seed, another draw; caps keep a seeded subset
    again = choose_records([3000, 3000], [3, 1], [None, None], 2000, seed=1)
    assert [len(x) for x in again] == used
    other = choose_records([3000, 3000], [3, 1], [None, None], 2000, seed=2)
    assert [len(x) for x in other] != used
    capped = choose_records([100, 50], [None, None], [10, None], None, seed=0)
    assert len(capped[0]) == 10 and len(set(capped[0])) == 10 and len(capped[1]) == 50
    # no mix_records: the mix stops where the first source would run out (1:1 of 3000 and 100 records -> ~200)
    small = choose_records([3000, 100], [1, 1], [None, None], None, seed=0)
    assert sum(map(len, small)) == 200


def count_builds(monkeypatch):
    built = []
    original = data_prepare.build_entry
    monkeypatch.setattr(data_prepare, "build_entry", lambda *args: (built.append(1), original(*args)))
    return built


def test_cache_is_reused_and_rebuilt_when_any_key_changes(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "cache"))
    built = count_builds(monkeypatch)
    path = tmp_path / "t.jsonl"
    write(path, [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)], "jsonl")
    cfg = config([str(path)], eval_fraction=0.1)
    first = data_prepare.prepare(cfg, tokenizer, seed=0)
    second = data_prepare.prepare(cfg, tokenizer, seed=0)
    assert built == [1] and first.built and not second.built
    assert tokens(first.train) == tokens(second.train) and second.train.cache_files  # memory-mapped from disk
    changes = [(cfg, 1), (OmegaConf.merge(cfg, {"max_length": 64}), 0), (OmegaConf.merge(cfg, {"mask_prompt": False}), 0),
               (OmegaConf.merge(cfg, {"packing": True}), 0), (OmegaConf.merge(cfg, {"max_train_records": 5}), 0),
               (OmegaConf.merge(cfg, {"train_files": [{"path": str(path), "max_records": 20}]}), 0)]
    for changed, seed in changes:
        data_prepare.prepare(changed, tokenizer, seed=seed)
    assert len(built) == 1 + len(changes)
    other_template = AutoTokenizer.from_pretrained(str(data.ROOT / "configs" / "tokenizer"))
    other_template.chat_template = other_template.chat_template.replace("\\n", " ")
    data_prepare.prepare(cfg, other_template, seed=0)
    write(path, [{"instruction": f"q{i}", "output": f"b{i}"} for i in range(30)], "jsonl")  # same size, new content
    data_prepare.prepare(cfg, tokenizer, seed=0)
    assert len(built) == 3 + len(changes)
    data_prepare.prepare(cfg, tokenizer, seed=0)
    assert len(built) == 3 + len(changes)


def test_a_poisoned_or_partial_entry_is_rebuilt_never_read(tmp_path, tokenizer, monkeypatch, capsys):
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "cache"))
    built = count_builds(monkeypatch)
    cfg = config([write(tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)],
                        "jsonl")])
    good = tokens(data_prepare.prepare(cfg, tokenizer, seed=0).train)
    entry = data_prepare.prepare(cfg, tokenizer, seed=0).entry
    arrow = next((entry / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])  # a copy cut short
    assert tokens(data_prepare.prepare(cfg, tokenizer, seed=0).train) == good
    (entry / "selora_manifest.json").unlink()  # a build killed before its manifest
    assert tokens(data_prepare.prepare(cfg, tokenizer, seed=0).train) == good
    assert len(built) == 3 and capsys.readouterr().err.count("rebuilding it") == 2


RACER = textwrap.dedent("""
    import pathlib, sys, time
    from transformers import AutoTokenizer
    from recipes import data, data_prepare
    sys.path.insert(0, str(data.ROOT / "tests"))
    from test_data_prepare import config, slow_build_logging_to
    data_prepare.build_entry = slow_build_logging_to(sys.argv[2], data_prepare.build_entry)
    tok = AutoTokenizer.from_pretrained(str(data.ROOT / "configs" / "tokenizer"))
    pathlib.Path(sys.argv[3]).touch()  # imported: ready to race
    while not pathlib.Path(sys.argv[4]).exists():
        time.sleep(0.01)
    prepared = data_prepare.prepare(config([sys.argv[1]], packing=True), tok, seed=0)
    print(prepared.train["input_ids"])
""")


def slow_build_logging_to(log, build):
    def slow_build(*args):
        with open(log, "a") as handle:
            handle.write("built\n")
        time.sleep(1.5)  # the other process arrives while this one builds
        build(*args)
    return slow_build


def test_two_processes_on_a_cold_cache_build_it_once(tmp_path, tokenizer, monkeypatch):
    """This process and one more race on a cold cache (no process group: the file lock decides); either may win."""
    path = write(tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50)], "jsonl")
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "cache"))
    log, ready, go = tmp_path / "builds.log", tmp_path / "ready", tmp_path / "go"
    monkeypatch.setattr(data_prepare, "build_entry", slow_build_logging_to(log, data_prepare.build_entry))
    other = subprocess.Popen([sys.executable, "-c", RACER, path, str(log), str(ready), str(go)],
                             env={**os.environ, "PYTHONPATH": str(data.ROOT)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists() and other.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    mine = data_prepare.prepare(config([path], packing=True), tokenizer, seed=0)
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err
    assert log.read_text() == "built\n"  # one of the two built it, whichever took the lock; the other read it
    assert out.strip().splitlines()[-1] == str(mine.train["input_ids"])


def test_hub_names_resolve_through_the_local_datasets_cache_only(tmp_path, tokenizer, monkeypatch):
    # A hub data set as datasets caches it after a download: <cache>/<owner>___<name>/default/0.0.0/<hash>/.
    cache = tmp_path / "hf"
    datasets.load_dataset("json", data_files=write(tmp_path / "a.jsonl", [ALPACA], "jsonl"), cache_dir=str(cache))
    (cache / "json").rename(cache / "someone___tiny")
    config_dir = next((cache / "someone___tiny").iterdir())
    config_dir.rename(config_dir.parent / "default")
    for arrow in (cache / "someone___tiny").rglob("json-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("json-", "tiny-")))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    train, _ = data_prepare.build_datasets(config(["someone/tiny"]), tokenizer, seed=0)
    ids, labels, _ = data.encode_record(ALPACA, tokenizer)
    assert tokens(train) == [(ids, labels)]
    with pytest.raises(DataError, match=r"data source 'someone/absent' is not a file or folder here and not in the "
                                        r"local datasets cache .*nothing is downloaded"):
        data_prepare.build_datasets(config(["someone/absent"]), tokenizer, seed=0)


@pytest.mark.parametrize("entries, overrides, expected", [
    ([{"path": "a.jsonl", "wieght": 2}], {}, r"data.train_files\[0\]: unknown key 'wieght'; a source takes path"),
    ([{"path": "a.jsonl", "weight": 2}, "b.jsonl"], {}, r"some sources have a weight and some not"),
    ([{"path": "a.jsonl", "weight": -1}], {}, r"weight=-1 must be a number > 0"),
    ([{"path": "a.jsonl", "format": "oasst"}], {}, r"format='oasst'; choose one of auto, alpaca, chat, sharegpt"),
    (["a.jsonl"], {"fields": {"prompt": "x"}}, r"fields.prompt is not a field of format auto"),
    (["a.jsonl"], {"mix_records": 10}, r"data.mix_records=10 has no mix to size"),
    (["a.jsonl"], {"num_proc": "many"}, r"data.num_proc='many': give auto or a whole number >= 1"),
])
def test_new_keys_are_checked_up_front(entries, overrides, expected):
    with pytest.raises(DataError, match=expected):
        data_prepare.check_data_config(config(entries, **overrides))


def test_bad_records_of_new_formats_name_their_row_or_line(tmp_path, tokenizer):
    bad_turn = [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]
    path = write(tmp_path / "s.jsonl", [{"conversations": SHAREGPT}, {"conversations": bad_turn}], "jsonl")
    with pytest.raises(DataError, match=r"s.jsonl line 2: field 'conversations\[1\].from' is 'bot'; use one of"):
        data_prepare.build_datasets(config([path]), tokenizer, seed=0)
    path = write(tmp_path / "p.parquet", [ALPACA, {**ALPACA, "output": ""}], "parquet")
    with pytest.raises(DataError, match=r"p.parquet row 1: field 'output' is empty"):
        data_prepare.build_datasets(config([path]), tokenizer, seed=0)
    path = write(tmp_path / "odd.jsonl", [{"question": "a"}], "jsonl")
    with pytest.raises(DataError, match=r"cannot tell the format from its fields \(question\)"):
        data_prepare.build_datasets(config([path]), tokenizer, seed=0)
