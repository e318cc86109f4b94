"""Experiment trackers beyond metrics.jsonl, chosen by train.report_to: tensorboard (recipes/metrics.py writes it),
wandb and mlflow (here). Both are optional extras (``pip install '.[wandb]'``, ``'.[mlflow]'``) and work without a
network by default:

- wandb: offline mode (runs under output_dir/wandb/, uploaded later with ``wandb sync``) unless WANDB_MODE says
  otherwise; project from WANDB_PROJECT (default "selora").
- mlflow: a SQLite store in output_dir/mlflow.db (MLflow's own default backend; its plain-file store is retired)
  unless MLFLOW_TRACKING_URI names another; experiment from MLFLOW_EXPERIMENT_NAME (default "selora").

Each start of a run (a resumed one too) is one tracker run, named after output_dir, with the resolved config as
its config (W&B) or parameters (MLflow). Only global rank 0 logs (recipes/metrics.py opens them there only).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

CHOICES = ("tensorboard", "wandb", "mlflow")
# What each tracker imports, and how to install it.
NEEDS = {"wandb": ("wandb",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}
INSTALL = {"wandb": "pip install 'wandb>=0.19'",
           "mlflow": "pip install 'mlflow-skinny>=3' sqlalchemy alembic"}
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"


class TrackerConfigError(ValueError):
    """A train.report_to entry that is unknown or not installed."""


def report_to(train) -> list[str]:
    """The trackers this run reports to: train.report_to, less tensorboard when train.tensorboard=false (the older
    switch, kept so that existing recipes and command lines keep their meaning)."""
    names = list(dict.fromkeys(str(name) for name in train.report_to))
    return [name for name in names if name != "tensorboard" or train.tensorboard]


def check_report_to(train) -> None:
    """TrackerConfigError for a name that is not a tracker, or one whose package is not installed."""
    names = [str(name) for name in train.report_to]
    for name in names:
        if name not in CHOICES:
            raise TrackerConfigError(f"train.report_to={names}: {name!r} is not a tracker; choose from "
                                     f"{', '.join(CHOICES)} (a list, e.g. train.report_to=[tensorboard,wandb])")
    for name in report_to(train):
        needs = NEEDS.get(name, ())
        if name == "mlflow" and not _default_mlflow_store():
            needs = ("mlflow",)  # a server or another store: no SQLite of our own
        missing = [module for module in needs if not _installed(module)]
        if missing:
            raise TrackerConfigError(f"train.report_to names {name}, but {', '.join(missing)} is not installed: "
                                     f"{INSTALL[name]} (or pip install '.[{name}]' in a selora checkout)")


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def _default_mlflow_store() -> bool:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return not uri or uri.startswith("sqlite:")


def open_tracker(name: str, output_dir: Path, config: dict):
    """The tracker ``name`` (wandb or mlflow) started for this run; it has ``log(step, scalars)`` and ``close()``."""
    return {"wandb": WandbTracker, "mlflow": MlflowTracker}[name](Path(output_dir), config)


class WandbTracker:
    def __init__(self, output_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "selora"), name=output_dir.resolve().name,
                              dir=str(output_dir), mode=os.environ.get("WANDB_MODE", "offline"), config=config,
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, output_dir: Path, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        output_dir = output_dir.resolve()
        default = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = f"sqlite:///{output_dir / MLFLOW_DB}" if default else os.environ["MLFLOW_TRACKING_URI"]
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "selora")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # artifacts beside the store (MLflow's default would be ./mlruns of wherever the run started)
            location = (output_dir / MLFLOW_ARTIFACTS).as_uri() if default else None
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        self.run_id = self.client.create_run(experiment_id, run_name=output_dir.name).info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in _flat(config).items()]  # MLflow's value limit
        for start in range(0, len(params), 100):  # and its batch limit
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step)
                                                    for key, value in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out
