"""recipes/data.py: loading, validation errors that name file/line/field, prompt masking, packing, splits."""
import json

import datasets
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from recipes import data, data_prepare
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


def rows_of(lengths: list[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": [[n] * n for n in lengths], "labels": [[n] * n for n in lengths],
                                       "attention_mask": [[1] * n for n in lengths]})


def test_packing_fills_rows_best_fit_longest_first():
    # Greedy packing of consecutive examples would need three rows ([6] [5, 4] [3, 2]); best fit needs two.
    packed = data.pack_sequences(rows_of([6, 5, 4, 3, 2]), 10)
    assert packed["input_ids"] == [[6] * 6 + [4] * 4, [5] * 5 + [3] * 3 + [2] * 2]
    assert packed["labels"] == packed["input_ids"]
    # An example longer than what is left anywhere opens a row; equal lengths keep the dataset's order.
    packed = data.pack_sequences(rows_of([3, 8, 3, 3]), 8)
    assert [row[0] for row in packed["input_ids"]] == [8, 3, 3] and list(map(len, packed["input_ids"])) == [8, 6, 3]


def test_collate_rounds_the_width_up_to_a_multiple_within_max_length():
    examples = lambda *lengths: [{"input_ids": [1] * n, "labels": [1] * n, "attention_mask": [1] * n} for n in lengths]
    collate = data.make_collate_fn(0, pad_to_multiple_of=64, max_length=200)
    assert collate(examples(3, 70))["input_ids"].shape == (2, 128)
    assert collate(examples(130))["input_ids"].shape == (1, 192)
    assert collate(examples(195))["input_ids"].shape == (1, 200)  # 256 would pass max_length
    assert collate(examples(64))["input_ids"].shape == (1, 64)
    batch = collate(examples(5))
    assert batch["attention_mask"].sum() == 5 and (batch["labels"][0, 5:] == IGNORE_INDEX).all()
    assert data.make_collate_fn(0)(examples(3, 70))["input_ids"].shape == (2, 70)  # 1: the longest, as before
    assert data.make_collate_fn(0, 64, max_length=50)(examples(60))["input_ids"].shape == (1, 60)  # never cut


def test_pad_multiple_is_64_on_a_gpu_and_1_on_a_cpu_unless_given():
    auto = OmegaConf.create({"pad_to_multiple_of": "auto"})
    assert data.pad_multiple(auto, torch.device("cuda")) == 64 and data.pad_multiple(auto, torch.device("cpu")) == 1
    assert data.pad_multiple(OmegaConf.create({"pad_to_multiple_of": "8"}), torch.device("cpu")) == 8
    with pytest.raises(data.DataError, match="data.pad_to_multiple_of='-2'"):
        data.pad_multiple(OmegaConf.create({"pad_to_multiple_of": "-2"}), torch.device("cpu"))


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
    train, evaluation = data_prepare.build_datasets(cfg, tokenizer, seed=0)
    assert len(train) == 15 and len(evaluation) == 4
    cfg.train_files = [cfg.train_files[0], "missing.jsonl"]
    with pytest.raises(DataError, match="missing.jsonl"):
        data_prepare.build_datasets(cfg, tokenizer, seed=0)


def test_padding_free_packs_a_micro_batch_worth_of_tokens_per_row(tmp_path, tokenizer):
    records = [{"instruction": "word " * n, "output": "x " * n} for n in range(5, 25)] * 2
    cfg = OmegaConf.create(dict(train_files=[write_jsonl(tmp_path / "t.jsonl", records)], eval_files=[],
                                format="auto", max_length=128, packing=False, padding_free=True, eval_fraction=0.1,
                                mask_prompt=True, max_train_records=None, max_eval_records=None))
    train, _ = data_prepare.build_datasets(cfg, tokenizer, seed=0, micro_batch_size=4)
    plain, _ = data_prepare.build_datasets(OmegaConf.merge(cfg, {"padding_free": False}), tokenizer, seed=0)
    lengths = [len(row) for row in train["input_ids"]]
    assert max(lengths) <= 4 * 128 and sum(lengths) == sum(map(len, plain["input_ids"]))
    assert sum(lengths) / (len(lengths) * 4 * 128) > 0.9  # rows nearly full: a step sees ~4 x 128 real tokens
    assert sum(p == 0 for row in train["position_ids"] for p in row) == len(plain)  # one start per example


# ----- special tokens with real chat-template styles: never doubled ------------------------------------------------
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "'<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = '' %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 %}"
    "{% set content = system_message + message['content'] %}{% else %}{% set content = message['content'] %}"
    "{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHATML_TEMPLATE = (  # Qwen2 and SmolLM2: a default system turn, <|im_start|>role ... <|im_end|>
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
STYLES = {  # bos, eos, whether the tokenizer itself prepends BOS, template, extra special tokens
    "llama2": ("<s>", "</s>", True, LLAMA2_TEMPLATE, []),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", True, LLAMA3_TEMPLATE, ["<|start_header_id|>", "<|end_header_id|>"]),
    "qwen2": (None, "<|im_end|>", False, CHATML_TEMPLATE, ["<|im_start|>", "<|endoftext|>"]),
    "smollm2": ("<|im_start|>", "<|im_end|>", False, CHATML_TEMPLATE, []),
}


def style_tokenizer(style):
    """A word-level tokenizer with the special tokens, BOS convention and chat template of a model family
    (ordinary words are all [UNK]: only the special tokens matter here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    bos, eos, adds_bos, template, extra = STYLES[style]
    specials = ["[UNK]"] + [t for t in (bos, eos) if t] + extra
    backend = Tokenizer(models.WordLevel({s: i for i, s in enumerate(specials)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="[UNK]",
                                   pad_token=eos, chat_template=template)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_special_tokens_are_never_doubled(tmp_path, style):
    tokenizer = style_tokenizer(style)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there?"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                         {"role": "assistant", "content": "Bye now."}]}
    for record in (chat, ALPACA[1]):
        ds = data.tokenize_records(data.load_records(write_jsonl(tmp_path / f"{style}.jsonl", [record])), tokenizer, 256)
        ids, labels = ds[0]["input_ids"], ds[0]["labels"]
        pairs = list(zip(ids, ids[1:]))
        assert (eos, eos) not in pairs and (bos is None or (bos, bos) not in pairs), (style, ids)
        learned = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
        assert learned.count(eos) == (2 if "messages" in record else 1)  # one end per answer, learned
        assert ids[-1] == eos or (style in ("qwen2", "smollm2") and ids[-2] == eos)  # ChatML ends "<|im_end|>\n"
        expected_start = STYLES[style][2] or (style == "smollm2" and "messages" in record)
        assert (ids[0] == bos) == bool(expected_start), (style, ids)  # BOS once, from the tokenizer or template
    # the prompt an answer is generated from is the training prompt: everything before the first learned token
    ids, labels, first = data.encode_record(ALPACA[1], tokenizer)
    assert data.encode_prompt(ALPACA[1], tokenizer) == ids[:first] and labels[first] != IGNORE_INDEX


def test_unknown_file_type_is_named_as_such(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("instruction,output\nadd 1 and 2,3\n")
    with pytest.raises(DataError, match=r"data.txt: not a data file type selora reads \(.txt\); give .json, .jsonl"):
        data.load_records(str(path))
