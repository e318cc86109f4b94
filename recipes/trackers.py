"""Experiment trackers beyond metrics.jsonl, chosen by train.report_to: tensorboard (recipes/metrics.py writes it),
wandb and mlflow (here). Both are optional extras (``pip install '.[wandb]'``, ``'.[mlflow]'``) and work without a
network by default:

- wandb: offline mode (runs under output_dir/wandb/, uploaded later with ``wandb sync``) unless WANDB_MODE says
  otherwise; project from WANDB_PROJECT (default "selora").
- mlflow: a SQLite store in output_dir/mlflow.db (MLflow's own default backend; its plain-file store is retired)
  unless MLFLOW_TRACKING_URI names another; experiment from MLFLOW_EXPERIMENT_NAME (default "selora").

A training run is one tracker run, named after output_dir, with the resolved config as its config (W&B) or
parameters (MLflow). A start that resumes a checkpoint continues the run the first start opened (the ids are kept
in output_dir/tracker_runs.json), however often a cluster requeues the job. The steps logged between the last
checkpoint and the interruption come again with the same values (a resume is exact): W&B keeps the first of
each, MLflow's history lists both. Only global rank 0 logs (recipes/metrics.py opens them there only).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from recipes.checkpoint import write_text_atomically

CHOICES = ("tensorboard", "wandb", "mlflow")
# What each tracker imports, and how to install it.
NEEDS = {"wandb": ("wandb",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}
INSTALL = {"wandb": "pip install 'wandb>=0.19'",
           "mlflow": "pip install 'mlflow-skinny>=3' sqlalchemy alembic"}
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
RUN_IDS = "tracker_runs.json"  # {tracker: run id} of this output_dir's training run


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


def open_trackers(names, output_dir: Path, config: dict, resumed: bool) -> list:
    """The trackers ``names`` (wandb, mlflow) started for this run, each with ``log(step, scalars)`` and
    ``close()``; ``resumed`` (the start continues a checkpoint): continue the runs the first start opened."""
    ids_file = Path(output_dir) / RUN_IDS
    earlier = _read_run_ids(ids_file) if resumed else {}
    trackers = {name: {"wandb": WandbTracker, "mlflow": MlflowTracker}[name](Path(output_dir), config,
                                                                             earlier.get(name))
                for name in names}
    if trackers:
        write_text_atomically(ids_file, json.dumps({**earlier, **{n: t.run_id for n, t in trackers.items()}}) + "\n")
    return list(trackers.values())


def _read_run_ids(path: Path) -> dict:
    """{tracker: run id}; empty when the file is missing or unreadable (a new tracker run is then started)."""
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


class WandbTracker:
    def __init__(self, output_dir: Path, config: dict, run_id: str | None = None):
        """``run_id``: an earlier start's run, continued."""
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "selora"), name=output_dir.resolve().name,
                              dir=str(output_dir), mode=os.environ.get("WANDB_MODE", "offline"), config=config,
                              id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(console="off", silent=True))
        self.run_id = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, output_dir: Path, config: dict, run_id: str | None = None):
        """``run_id``: an earlier start's run, continued when the store still has it (its parameters stay)."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        output_dir = output_dir.resolve()
        default = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = f"sqlite:///{output_dir / MLFLOW_DB}" if default else os.environ["MLFLOW_TRACKING_URI"]
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return
            except MlflowException:  # another store than the first start's: a run of its own
                pass
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
