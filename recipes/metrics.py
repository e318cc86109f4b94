"""Training metrics: one JSON line per logged step in output_dir/metrics.jsonl, mirrored to TensorBoard and the
trackers of train.report_to (W&B, MLflow: recipes/trackers.py).

Only rank 0 writes; other ranks get a logger whose methods do nothing, so the loop calls it unconditionally.
A line looks like {"step": 12, "loss": 1.93, "lr": 0.0002, "tokens_per_s": 5310.2, "tokens": 1790.0,
"padding_share": 0.03} (real tokens per optimizer step, and the share of computed positions that were padding),
plus "peak_memory_gib" on a GPU (rank 0's allocated high-water mark so far), "eval_loss" when evaluated, "srlora" (the recomposition events) when SRLoRA fused pairs at that step, and
"time_breakdown" (seconds per step by phase) with train.time_breakdown=true.
"""
from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    def __init__(self, output_dir: str | Path, rank: int, tensorboard: bool, resume_step: int = 0,
                 trackers: tuple[str, ...] = (), config: dict | None = None):
        """``resume_step``: lines past it (written by a run that died after its last checkpoint) are dropped,
        so the file reads as one uninterrupted run. ``trackers``: wandb / mlflow, started here (rank 0 only)
        with ``config`` (the resolved config) as the run's settings, or continued when resuming."""
        self.enabled = rank == 0
        self.path = Path(output_dir) / METRICS_FILE
        self.writer = None
        self.trackers = []
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = [line for line in read_metrics(self.path) if line["step"] <= resume_step] if resume_step else []
        self.path.write_text("".join(json.dumps(line) + "\n" for line in keep))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / TENSORBOARD_DIR),
                                        purge_step=resume_step + 1 if resume_step else None)
        from recipes.trackers import open_trackers
        self.trackers = open_trackers(trackers, Path(output_dir), config or {}, resumed=resume_step > 0)

    def log(self, step: int, **values) -> None:
        """Append one line; None values are left out. Numbers also go to TensorBoard as train/<name>."""
        if not self.enabled:
            return
        line = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        if self.writer is not None:
            for key, value in line.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)
            if "srlora" in line:
                self.writer.add_scalar("srlora/pairs_fused", sum(len(e["pairs"]) for e in line["srlora"]), step)
        if self.trackers:  # the names TensorBoard shows
            scalars = {f"train/{k}": v for k, v in line.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if "srlora" in line:
                scalars["srlora/pairs_fused"] = sum(len(e["pairs"]) for e in line["srlora"])
            for tracker in self.trackers:
                tracker.log(step, scalars)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


class PhaseTimer:
    """Seconds per phase of the training step (data, forward, backward, optimizer, srlora, log), averaged over
    the optimizer steps since the last log line. Off by default: to attribute time to a phase on a GPU it must
    synchronise at every boundary, which costs the overlap of host and device work."""

    def __init__(self, device, enabled: bool):
        import time

        self.enabled, self.device, self.clock = enabled, device, time.perf_counter
        self.totals: dict[str, float] = {}
        self.steps = 0
        self.last = self.clock()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to ``phase``."""
        if not self.enabled:
            return
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        now = self.clock()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.steps += phase == "log"  # "log" closes an optimizer step
        self.last = now

    def reduce(self) -> dict[str, float]:
        """Mean seconds per optimizer step for each phase since the last call ("log" of the current step is
        charged to the next window)."""
        steps = max(self.steps, 1)
        result = {phase: total / steps for phase, total in self.totals.items()}
        self.totals, self.steps = {}, 0
        return result


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl (an empty list if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:  # the last line of a run killed mid-write
            continue
    return lines
