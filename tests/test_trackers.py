"""train.report_to: Weights & Biases (offline) and MLflow (a SQLite store in output_dir) get the numbers of
metrics.jsonl at the same steps, with the resolved config, and no network; only rank 0 opens them."""
import json
import re

import pytest

from launch.config import resolve
from recipes import finetune, trackers

from conftest import SMALL_RUN, kill_at_step


def test_wandb_offline_and_mlflow_local_get_the_run(tmp_path, monkeypatch):
    import mlflow.tracking
    import wandb

    for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: no upload could succeed
    sent = []
    run_log = wandb.sdk.wandb_run.Run.log

    def log_and_keep(self, data, step=None, **kwargs):
        sent.append((step, dict(data)))
        return run_log(self, data, step=step, **kwargs)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log_and_keep)

    out = tmp_path / "run"
    cfg = resolve("llama_selora", SMALL_RUN + ["train.max_steps=3", "train.eval_every=3", "train.save_every=0",
                                                "train.export_peft=false", "train.sample_prompts=[]",
                                                "train.report_to=[tensorboard,wandb,mlflow]",
                                                f"train.output_dir={out}"])
    assert trackers.report_to(cfg.train) == ["wandb", "mlflow"]  # SMALL_RUN's train.tensorboard=false wins
    finetune.run(cfg)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {line["step"]: line["loss"] for line in lines}
    assert sorted(losses) == [1, 2, 3] and "eval_loss" in lines[-1]

    # W&B: offline, under output_dir; the same numbers at the same steps.
    assert {step: data["train/loss"] for step, data in sent} == losses
    assert sent[-1][1]["train/eval_loss"] == lines[-1]["eval_loss"]
    [record] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    content = record.read_bytes()
    assert b"train/loss" in content and b"train/eval_loss" in content and b"learning_rate" in content
    assert not (out / "tensorboard").exists()

    # MLflow: a SQLite store in output_dir, one run named after it, the config as parameters.
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{out / trackers.MLFLOW_DB}")
    [run] = client.search_runs([client.get_experiment_by_name("selora").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "3" and run.data.params["model.preset"] == "tiny_llama"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == losses
    assert client.get_metric_history(run.info.run_id, "train/eval_loss")[0].value == lines[-1]["eval_loss"]
    assert not any(re.match(r"mlruns", p.name) for p in tmp_path.iterdir())


def test_a_resumed_run_continues_its_tracker_runs(tmp_path, monkeypatch):
    """A run killed after its step-2 checkpoint and resumed is one MLflow run with every step once, and one W&B
    run (the resumed start's offline records carry the first start's id): what a requeued cluster job shows."""
    import mlflow.tracking
    import wandb

    for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY",
                 "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    out = tmp_path / "run"
    cfg = resolve("llama_selora", SMALL_RUN + ["train.max_steps=4", "train.save_every=2", "train.log_every=1",
                                                "train.eval_every=0", "train.export_peft=false",
                                                "train.sample_prompts=[]", "train.report_to=[wandb,mlflow]",
                                                f"train.output_dir={out}"])
    revive = kill_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg)
    wandb.finish()  # the killed process's W&B run ends with it
    first = json.loads((out / trackers.RUN_IDS).read_text())
    revive()
    finetune.run(cfg)  # train.resume=auto: from step 2
    assert json.loads((out / trackers.RUN_IDS).read_text()) == first

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{out / trackers.MLFLOW_DB}")
    [run] = client.search_runs([client.get_experiment_by_name("selora").experiment_id])
    assert run.info.run_id == first["mlflow"] and run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    losses = {line["step"]: line["loss"] for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert history == sorted(losses.items()) and sorted(losses) == [1, 2, 3, 4]

    starts = sorted((out / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(start.name.endswith(f"-{first['wandb']}") for start in starts)
