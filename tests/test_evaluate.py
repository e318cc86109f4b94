"""launch/evaluate.py and recipes/evaluation.py / inference.py: accuracy and answer loss checked against numbers
worked out by hand (a model whose logits are a fixed bias), a selora and a PEFT adapter dir of one run scoring
the same, base recorded with the adapter, one error line for bad input."""
import json

import pytest
import torch

from conftest import torchrun
from launch import evaluate
from launch.config import resolve
from recipes import evaluation, finetune, inference
from recipes.data import IGNORE_INDEX
from recipes.modeling import load_model, load_tokenizer

CPU = torch.device("cpu")
TINY = ["model.preset=tiny_llama"]
CHOICE = [{"instruction": f"Please answer with true or false, question: is {q}?", "input": "",
           "output": f"the correct answer is {a}", "answer": a}
          for q, a in (("water wet", "true"), ("fire cold", "false"), ("snow white", "true"), ("grass green", "true"))]
MATH = [{"instruction": f"Tom has {n} apples. How many apples does he have?", "input": "",
         "output": f"\nA: Tom has {n} apples. The answer is {a}.", "answer": a}
        for n, a in ((7, "7"), (3, "3"), (7, "7.0"), (12, "12"))]


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    cfg = resolve("llama_selora", TINY)
    return load_tokenizer(cfg.tokenizer, cfg.model)


def unigram(bias: torch.Tensor):
    """The tiny preset made to predict the same distribution softmax(bias) at every position: hidden states are
    zeroed by the final norm and lm_head becomes a bias-only layer."""
    model = load_model(resolve("llama_selora", TINY).model, CPU)[0].eval()
    torch.nn.init.zeros_(model.model.norm.weight)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    torch.nn.init.zeros_(head.weight)
    head.bias.data.copy_(bias)
    model.lm_head = head
    return model


def test_choice_accuracy_and_loss_match_a_hand_computation(tmp_path, tokenizer):
    task = evaluation.load_task("tf", write(tmp_path / "tf.jsonl", CHOICE))
    assert task.kind == "choice" and task.labels == ["false", "true"]
    # Boost the tokens that only the "true" answer text has: every record is then predicted "true".
    texts = {label: inference.scored_example(CHOICE[0], tokenizer, evaluation.label_output(CHOICE[0], label))
             for label in task.labels}
    learned = {label: [t for t, l in zip(*pair) if l != IGNORE_INDEX] for label, pair in texts.items()}
    bias = torch.zeros(len(tokenizer))
    bias[sorted(set(learned["true"]) - set(learned["false"]))] = 6.0
    model = unigram(bias)
    result = evaluation.evaluate_task(model, tokenizer, task, batch_size=3)
    assert result["n"] == 4 and result["accuracy"] == 0.75  # three of the four gold answers are "true"
    # Loss by hand: each gold target token t costs logsumexp(bias) - bias[t] nats.
    lse = torch.logsumexp(bias, 0).item()
    costs = [lse - bias[t].item() for record in CHOICE
             for t, l in zip(*inference.scored_example(record, tokenizer, record["output"])) if l != IGNORE_INDEX]
    assert result["answer_loss"] == pytest.approx(sum(costs) / len(costs), rel=2e-5)  # float32 logsumexp


def test_math_accuracy_by_generated_number(tmp_path, tokenizer):
    task = evaluation.load_task("apples", write(tmp_path / "m.jsonl", MATH))
    assert task.kind == "math"
    seven = tokenizer("7", add_special_tokens=False)["input_ids"]
    assert len(seven) == 1
    bias = torch.zeros(len(tokenizer))
    bias[seven[0]] = 9.0  # greedy generation says "7"
    model = unigram(bias)
    result = evaluation.evaluate_task(model, tokenizer, task, batch_size=3, max_new_tokens=1)
    assert result["accuracy"] == 0.5  # gold 7 and 7.0 match, 3 and 12 do not
    for generate_batch_size in (1, 4):  # generation's own batch changes nothing but the speed
        again = evaluation.evaluate_task(model, tokenizer, task, batch_size=3, max_new_tokens=1,
                                         generate_batch_size=generate_batch_size)
        assert (again["accuracy"], again["answer_loss"]) == (result["accuracy"], result["answer_loss"])
    lse = torch.logsumexp(bias, 0).item()
    costs = [lse - bias[t].item() for record in MATH
             for t, l in zip(*inference.scored_example(record, tokenizer, record["output"])) if l != IGNORE_INDEX]
    assert result["answer_loss"] == pytest.approx(sum(costs) / len(costs), rel=2e-5)  # float32 logsumexp


@pytest.mark.parametrize("text, number", [("so 3 + 4 = 7. The answer is 7.", 7.0), ("The answer is $1,250.50", 1250.5),
                                          ("first 3 then 12", 12.0), ("The answer is -4 and 9", -4.0),
                                          ("no digits", None)])
def test_extract_number(text, number):
    assert inference.extract_number(text) == number


def test_tolerance():
    assert inference.numbers_match(7.0004, 7.0) and not inference.numbers_match(7.002, 7.0)
    assert inference.numbers_match(1_000_050.0, 1_000_000.0) and not inference.numbers_match(1_000_200.0, 1_000_000.0)


def test_selora_and_peft_dirs_of_one_run_score_the_same(tmp_path, capsys):
    out = tmp_path / "run"
    finetune.run(resolve("llama_selora", TINY + [
        f"train.output_dir={out}", "train.max_steps=3", "train.learning_rate=3e-2", "train.save_every=0",
        "train.eval_every=0", "train.tensorboard=false", "data.max_train_records=12", "train.micro_batch_size=4",
        "train.gradient_accumulation_steps=1", "train.warmup_steps=0"]))
    tasks = ["--task", f"tf={write(tmp_path / 'tf.jsonl', CHOICE)}", "--task", f"m={write(tmp_path / 'm.jsonl', MATH)}",
             "--max-new-tokens", "8", "--batch-size", "3"]
    reports = {}
    for kind, extra in (("adapter", []), ("peft_adapter", ["--model-preset", "tiny_llama"]), ("base", None)):
        args = ["--adapter", str(out / kind), *extra] if extra is not None else ["--model-preset", "tiny_llama"]
        assert evaluate.main([*args, *tasks, "--out", str(tmp_path / f"{kind}.json")]) == 0
        reports[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
    for kind, extra in (("adapter", []), ("peft_adapter", ["--model-preset", "tiny_llama"])):  # merged first
        args = ["--adapter", str(out / kind), *extra, "--merge", *tasks, "--out", str(tmp_path / f"{kind}_m.json")]
        assert evaluate.main(args) == 0
        merged = json.loads((tmp_path / f"{kind}_m.json").read_text())["tasks"]
        for name in ("tf", "m"):  # float32 base: the same accuracy, the loss to rounding
            assert merged[name]["accuracy"] == reports[kind]["tasks"][name]["accuracy"]
            assert abs(merged[name]["answer_loss"] - reports[kind]["tasks"][name]["answer_loss"]) < 1e-5
    assert reports["adapter"]["model"] == "preset:tiny_llama"  # the base recorded with the selora adapter
    for name in ("tf", "m"):
        selora_result, peft_result = reports["adapter"]["tasks"][name], reports["peft_adapter"]["tasks"][name]
        assert selora_result["accuracy"] == peft_result["accuracy"] and selora_result["n"] == 4
        assert abs(selora_result["answer_loss"] - peft_result["answer_loss"]) < 1e-4
        # the adapter is not a no-op: the base model scores differently
        assert abs(selora_result["answer_loss"] - reports["base"]["tasks"][name]["answer_loss"]) > 1e-3
    assert "tf: choice accuracy" in capsys.readouterr().out


def test_bad_input_is_one_error_line(tmp_path, capsys):
    good = write(tmp_path / "good.jsonl", MATH)
    text = tmp_path / "data.txt"
    text.write_text("instruction,output,answer\nadd 1 and 2,3,3\n")
    no_answer = write(tmp_path / "no_answer.jsonl", [{k: v for k, v in MATH[0].items() if k != "answer"}])
    unknown = tmp_path / "not_an_adapter"
    unknown.mkdir()
    (unknown / "adapter_config.json").write_text("{}")
    cases = [(["--task", f"m={tmp_path / 'missing.json'}"], "missing.json"),
             (["--task", f"m={text}"], "not a data file type selora reads (.txt)"),
             (["--task", f"m={no_answer}"], "field 'answer'"),
             (["--task", "no-equals-sign"], "NAME=FILE"),
             (["--adapter", str(unknown), "--task", f"m={good}"], "neither a selora adapter"),
             (["--adapter", str(tmp_path / "nowhere"), "--task", f"m={good}"], "does not exist"),
             (["--merge", "--quantization", "4bit", "--task", f"m={good}"], "--merge with --quantization 4bit")]
    for args, expected in cases:
        assert evaluate.main(["--model-preset", "tiny_llama", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


@pytest.mark.multiprocess
def test_torchrun_shards_give_the_single_process_report(tmp_path):
    import os
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    records = [dict(r, instruction=r["instruction"] + " " * i) for i, r in enumerate(MATH + MATH[:1])]  # 5: uneven
    tasks = ["--model-preset", "tiny_llama", "--task", f"tf={write(tmp_path / 'tf.jsonl', CHOICE)}",
             "--task", f"m={write(tmp_path / 'm.jsonl', records)}", "--max-new-tokens", "4", "--batch-size", "2"]
    assert evaluate.main([*tasks, "--out", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    subprocess.run([*torchrun(2), "launch/evaluate.py", *tasks,
                    "--out", str(tmp_path / "two.json")], cwd=root, env=env, check=True, timeout=300)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["tasks"] for n in ("one", "two"))
    for name in ("tf", "m"):
        assert two[name]["n"] == one[name]["n"] and two[name]["accuracy"] == one[name]["accuracy"]
        assert abs(two[name]["answer_loss"] - one[name]["answer_loss"]) < 1e-4


def test_generate_cli_answers_each_prompt_and_refuses_none(capsys, monkeypatch):
    import io
    from launch import generate
    assert generate.main(["--model-preset", "tiny_llama", "--prompt", "What is 2 plus 3?", "--prompt", "Hi",
                          "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("### ") == 2 and "### What is 2 plus 3?" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert generate.main(["--model-preset", "tiny_llama"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no prompt")
