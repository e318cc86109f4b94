"""recipes/resume.py: the run's settings are worked out once per start, also when a checkpoint is checked
against them, and a resume with other settings is refused before anything loads."""
import pytest

from launch.config import resolve
from recipes import finetune, resume
from recipes.checkpoint import CheckpointError

from conftest import SMALL_RUN


def test_run_settings_are_resolved_once_per_start(tmp_path, monkeypatch):
    calls = []
    original = resume.run_settings
    monkeypatch.setattr(resume, "run_settings", lambda cfg: calls.append(1) or original(cfg))
    overrides = SMALL_RUN + [f"train.output_dir={tmp_path}", "train.save_every=2", "train.eval_every=0"]
    finetune.run(resolve("llama_selora", overrides + ["train.max_steps=2"]))
    assert len(calls) == 1
    finetune.run(resolve("llama_selora", overrides + ["train.max_steps=4"]))  # resume=auto checks the settings
    assert len(calls) == 2
    with pytest.raises(CheckpointError, match=r"adapter\.r=\d+ \(now 5\)"):
        resume.plan_resume(resolve("llama_selora", overrides + ["train.max_steps=6", "adapter.r=5"]))
