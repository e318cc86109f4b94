"""The recipe in one process: trains to the end (loss goes down), exports a PEFT adapter that PEFT loads with
the same outputs, resumes exactly after a crash, and refuses broken checkpoints with a clear error."""
import json
import shutil

import pytest
import torch

import selora
from launch.config import resolve
from recipes import finetune
from recipes.modeling import load_model
from recipes.stop_request import STOP_FILE_ENV

from conftest import TINY_MODEL, kill_at_step

SMALL = TINY_MODEL + ["data.max_train_records=32", "data.max_eval_records=8", "train.micro_batch_size=4",
         "train.gradient_accumulation_steps=1", "train.warmup_steps=1", "train.eval_every=4", "train.tensorboard=false"]


def run(recipe, output_dir, *overrides):
    cfg = resolve(recipe, SMALL + [f"train.output_dir={output_dir}", *overrides])
    return finetune.run(cfg)


def losses(output_dir):
    lines = [json.loads(l) for l in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {l["step"]: l["loss"] for l in lines if "loss" in l}


@pytest.mark.parametrize("recipe", ["llama_lora", "llama_selora_srlora"])
def test_trains_and_exports_a_peft_adapter_that_matches(tmp_path, recipe):
    result = run(recipe, tmp_path, "train.max_steps=16", "train.learning_rate=3e-3", "train.save_every=0",
                 "srlora.schedule=fixed", "srlora.start_step=4", "srlora.interval=4", "srlora.end_step=12")
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 17))
    assert sum(list(curve.values())[-4:]) < sum(list(curve.values())[:4])  # 8 epochs of 32 records: it learns
    assert result["eval_loss"] is not None
    from peft import PeftModel
    model_cfg = resolve(recipe, TINY_MODEL).model
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    reference, _ = load_model(model_cfg, torch.device("cpu"))
    selora.load_adapter(reference, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(load_model(model_cfg, torch.device("cpu"))[0], str(tmp_path / "peft_adapter"))
    with torch.no_grad():
        expected = reference.eval()(input_ids=ids).logits
        got = peft_model.eval()(input_ids=ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_crash_then_resume_gives_the_uninterrupted_losses(tmp_path, monkeypatch):
    common = ["train.max_steps=10", "train.save_every=4", "srlora.schedule=fixed", "srlora.start_step=3", "srlora.interval=3",
              "srlora.end_step=9"]
    run("llama_selora_srlora", tmp_path / "straight", *common)
    revive = kill_at_step(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        run("llama_selora_srlora", tmp_path / "crashed", *common)
    revive()
    assert (tmp_path / "crashed" / "checkpoints" / "latest").read_text().strip() == "step_4"
    run("llama_selora_srlora", tmp_path / "crashed", *common)  # resume=auto
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")


def test_broken_checkpoints_fail_early_and_partial_ones_are_ignored(tmp_path, capsys):
    run("llama_selora", tmp_path, "train.max_steps=4", "train.save_every=2")
    checkpoints = tmp_path / "checkpoints"
    # A step directory written half-way (no pointer update) is never resumed from.
    shutil.copytree(checkpoints / "step_4", checkpoints / "step_6")
    next(p for p in (checkpoints / "step_6").rglob("*") if p.is_file()).unlink()
    assert finetune.resume.find_checkpoint(tmp_path, "auto") == checkpoints / "step_4"
    # The pointer names a checkpoint whose files are gone: a one-line error naming what is missing and the
    # older checkpoint to use instead (train.resume=auto would use it, see tests/test_checkpoint.py).
    shutil.rmtree(checkpoints / "step_4")
    from launch.train import main
    capsys.readouterr()  # drop the first run's progress bars
    code = main(["--recipe", "llama_selora", f"train.output_dir={tmp_path}", "train.max_steps=6",
                 f"train.resume={checkpoints}", *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "step_4" in err[0] and f"train.resume={checkpoints / 'step_2'}" in err[0], err


def test_the_loop_freezes_setup_out_of_the_collector_and_gives_it_back_even_when_it_raises(tmp_path, monkeypatch):
    """Objects built before the loop are frozen out of the garbage collector's rescans while it runs; a loop that
    raises still unfreezes them (in-process callers, like these tests, get their collector back)."""
    import gc
    frozen_during_steps = []
    real_step = finetune.engines.PlainEngine.step

    def step(self):
        frozen_during_steps.append(gc.get_freeze_count())
        if len(frozen_during_steps) == 2:
            raise RuntimeError("injected failure in the second step")
        return real_step(self)
    monkeypatch.setattr(finetune.engines.PlainEngine, "step", step)
    with pytest.raises(RuntimeError, match="injected failure"):
        run("llama_lora", tmp_path, "train.max_steps=4", "train.save_every=0", "train.eval_every=0")
    assert frozen_during_steps[0] > 0
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("log_every,save_every,stop_after", [(1, 3, 0), (0, 2, 0), (0, 3, 4)],
                         ids=["at-its-log-line", "at-its-checkpoint", "at-a-stop-request"])
def test_a_diverged_run_stops_with_a_clear_error_before_saving_it(tmp_path, monkeypatch, capsys, log_every, save_every,
                                                                  stop_after):
    """The engines take every step (no overflow skipping): when the loss stops being a number, the run stops at the
    next log line, checkpoint or stop request (whose checkpoint is not written), whichever comes first, with a
    one-line error, and never saves the diverged state (the last checkpoint stays the one to resume from)."""
    real_step = finetune.engines.PlainEngine.step
    steps = []
    stop_file = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop_file))

    def step_then_poison_after_the_third(self):
        stepped = real_step(self)
        steps.append(stepped)
        if sum(steps) == 3:  # the adapter's weights turn NaN: every later forward's loss is NaN
            with torch.no_grad():
                for param in self.params:
                    param.fill_(float("nan"))
        if stop_after and sum(steps) == stop_after:  # as a batch script's stop file, after this step
            stop_file.touch()
        return stepped
    monkeypatch.setattr(finetune.engines.PlainEngine, "step", step_then_poison_after_the_third)
    from launch.train import main
    capsys.readouterr()
    code = main(["--recipe", "llama_lora", f"train.output_dir={tmp_path}", "train.max_steps=8", f"train.save_every={save_every}",
                 f"train.log_every={log_every}", *SMALL])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # past the progress bar
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: step 4: the training loss is nan") and "train.learning_rate" in err[0], err
    checkpoints = tmp_path / "checkpoints"
    last_good = f"step_{save_every}"  # saved before the NaN step (4); nothing after it
    assert (checkpoints / "latest").read_text().strip() == last_good
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [last_good]
    assert not (tmp_path / "adapter").exists()
    if log_every:  # the diverged step's line is in the metrics, for the plots
        assert [(l["step"], l["loss"] == l["loss"]) for l in map(json.loads, (tmp_path / "metrics.jsonl").read_text()
                                                                 .splitlines()) if "loss" in l][-2:] == [(3, True), (4, False)]
