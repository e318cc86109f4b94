"""recipes/data.py: loading, validation errors that name file/line/field, prompt masking, packing, splits."""
import json

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from recipes import data
from recipes.data import DataError, IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(data.ROOT / "configs" / "tokenizer"))


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


ALPACA = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
          {"instruction": "Name the colour.", "input": "The sky on a clear day.", "output": "blue"}]


def learned_text(tokenizer, example):
    return tokenizer.decode([i for i, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])


def test_alpaca_masking_leaves_exactly_the_answer_and_eos(tmp_path, tokenizer):
    ds = data.tokenize_records(data.load_records(write_jsonl(tmp_path / "a.jsonl", ALPACA)), tokenizer, 256)
    for example, record in zip(ds, ALPACA):
        assert learned_text(tokenizer, example) == record["output"] + tokenizer.eos_token
        prompt = tokenizer.decode([i for i, l in zip(example["input_ids"], example["labels"]) if l == IGNORE_INDEX],
                                  skip_special_tokens=True)
        assert prompt == data.format_prompt(record)
        assert len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"])


def test_chat_masking_learns_only_assistant_turns(tmp_path, tokenizer):
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                           {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                           {"role": "assistant", "content": "Bye."}]}
    ds = data.tokenize_records(data.load_records(write_jsonl(tmp_path / "c.jsonl", [record])), tokenizer, 256)
    text = learned_text(tokenizer, ds[0])
    assert "Hello." in text and "Bye." in text
    assert "Be brief" not in text and "Hi?" not in text and "<|user|>" not in text
    assert text.count(tokenizer.eos_token) == 2


def test_without_mask_prompt_every_token_is_learned(tmp_path, tokenizer):
    ds = data.tokenize_records(data.load_records(write_jsonl(tmp_path / "a.jsonl", ALPACA)), tokenizer, 256,
                               mask_prompt=False)
    assert all(l != IGNORE_INDEX for l in ds[0]["labels"][1:])


def test_packing_keeps_every_token_and_respects_the_length(tmp_path, tokenizer):
    ds = data.tokenize_records(data.load_records(write_jsonl(tmp_path / "a.jsonl", ALPACA * 10)), tokenizer, 256)
    packed = data.pack_sequences(ds, 200)
    assert len(packed) < len(ds)
    assert all(len(row["input_ids"]) <= 200 for row in packed)
    assert sum(map(len, packed["input_ids"])) == sum(map(len, ds["input_ids"]))
    assert sorted(sum(packed["labels"], [])) == sorted(sum(ds["labels"], []))


def test_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
    ds = data.load_records(write_jsonl(tmp_path / "a.jsonl", records))
    train1, eval1 = data.train_eval_split(ds, 0.25, seed=3)
    train2, eval2 = data.train_eval_split(ds, 0.25, seed=3)
    assert eval1["instruction"] == eval2["instruction"] and len(eval1) == 10
    assert not set(train1["instruction"]) & set(eval1["instruction"])


def test_collate_pads_right_with_ignored_labels():
    batch = data.make_collate_fn(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
                                     {"input_ids": [8], "labels": [8], "attention_mask": [1]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("lines, expected", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '], r"line 2: not valid JSON"),
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'], r"line 2: field 'output' is missing"),
    (['{"instruction": 3, "output": "b"}'], r"line 1: field 'instruction' must be a string"),
    (['{"messages": [{"role": "robot", "content": "x"}]}'], r"line 1: field 'messages\[0\].role'"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], r"line 1: field 'messages' has no assistant turn"),
    (['[1, 2]'], r"line 1: a record must be a JSON object"),
    ([], r"holds no records"),
])
def test_bad_records_name_file_line_and_field(tmp_path, lines, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=expected) as error:
        data.load_records(path)
    assert "bad.jsonl" in str(error.value)


def test_missing_file_and_prompt_longer_than_max_length(tmp_path, tokenizer):
    with pytest.raises(DataError, match="'nope.jsonl' not found"):
        data.load_records("nope.jsonl")
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 200, "output": "x"}])
    with pytest.raises(DataError, match=r"long.jsonl line 1: the prompt takes \d+ tokens but data.max_length=64"):
        data.tokenize_records(data.load_records(path), tokenizer, 64)


def test_build_datasets_from_config(tmp_path, tokenizer):
    cfg = OmegaConf.create(dict(train_files=[write_jsonl(tmp_path / "t.jsonl", ALPACA * 20)], eval_files=[],
                                format="auto", max_length=128, packing=False, eval_fraction=0.1, mask_prompt=True,
                                max_train_records=15, max_eval_records=None))
    train, evaluation = data.build_datasets(cfg, tokenizer, seed=0)
    assert len(train) == 15 and len(evaluation) == 4
    cfg.train_files = [cfg.train_files[0], "missing.jsonl"]
    with pytest.raises(DataError, match="missing.jsonl"):
        data.build_datasets(cfg, tokenizer, seed=0)
