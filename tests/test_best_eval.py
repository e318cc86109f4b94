"""Early stopping and export of the best evaluation (recipes/best_eval.py): the run stops after
train.early_stopping_patience evaluations without improvement, a run killed and resumed stops at the same step with
the same result, and train.export_best exports the adapter the model had at the best evaluation."""
import json

import pytest
import torch
from safetensors.torch import load_file

import selora
from launch.config import resolve
from recipes import finetune

from conftest import SMALL_RUN, kill_at_step

# A learning rate high enough that the eval loss of the tiny model turns up after a few steps (then stops).
RUN = SMALL_RUN + ["train.max_steps=16", "train.eval_every=1", "train.save_every=1", "train.learning_rate=3e-2",
                   "adapter.r=4", "train.export_peft=false", "train.early_stopping_patience=2",
                   "train.export_best=true", "train.sample_prompts=[]"]


def run(output_dir, *overrides):
    return finetune.run(resolve("llama_selora", RUN + [f"train.output_dir={output_dir}", *overrides]))


def lines(output_dir):
    """metrics.jsonl without its timings."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def expected_stop(eval_losses: dict[int, float], patience: int) -> tuple[int, int]:
    """(step where the run must stop, step of the best eval loss) for evaluations at every step."""
    best, best_step, waited = None, None, 0
    for step in sorted(eval_losses):
        if best is None or eval_losses[step] < best:
            best, best_step, waited = eval_losses[step], step, 0
        else:
            waited += 1
        if waited == patience:
            return step, best_step
    raise AssertionError(f"the eval loss never stopped improving: {eval_losses}")


def test_early_stopping_across_a_resume_and_export_of_the_best(tmp_path, monkeypatch):
    snapshots = []  # the adapter at each evaluation, in order
    evaluate = finetune.evaluate

    def evaluate_and_keep(engine, *args, **kwargs):
        snapshots.append({k: v.clone() for k, v in selora.adapter_state_dict(engine.module).items()})
        return evaluate(engine, *args, **kwargs)
    monkeypatch.setattr(finetune, "evaluate", evaluate_and_keep)
    result = run(tmp_path / "straight")
    monkeypatch.setattr(finetune, "evaluate", evaluate)

    curve = {line["step"]: line["eval_loss"] for line in lines(tmp_path / "straight") if "eval_loss" in line}
    stop, best_step = expected_stop(curve, patience=2)
    assert stop < 16 and result["step"] == stop and result["best_step"] == best_step
    assert max(curve) == stop  # nothing trained after the stop
    exported = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    at_best, last = snapshots[best_step - 1], snapshots[-1]
    for key, value in at_best.items():
        assert torch.equal(exported[key], value), key
    assert any(not torch.equal(exported[k], last[k]) for k in last)  # the best is not the last
    assert sorted(p.name for p in (tmp_path / "straight" / "best").iterdir()) == [f"step_{best_step}"]

    # Killed at the stopping step (after its evaluation, before its checkpoint), resumed from the one before it,
    # where one evaluation without improvement was already counted.
    revive = kill_at_step(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    revive()
    state = json.loads((tmp_path / "resumed" / "checkpoints" / f"step_{stop - 1}" / "trainer_state.json").read_text())
    assert state["best_step"] == best_step and state["evals_without_improvement"] == stop - 1 - best_step
    resumed = run(tmp_path / "resumed")
    assert resumed["step"] == stop and resumed["best_step"] == best_step
    assert lines(tmp_path / "resumed") == lines(tmp_path / "straight")
    again = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)
