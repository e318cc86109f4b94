"""The best evaluation of a run: early stopping (train.early_stopping_patience, train.early_stopping_min_delta) and
exporting the adapter of the step with the lowest eval loss (train.export_best).

Where it stands lives in the trainer state, so a resumed run goes on counting: ``best_eval_loss``, ``best_step``
and ``evals_without_improvement``. With export_best, each improvement's adapter is written (selora.save_adapter:
all ranks gather, global rank 0 writes, atomically) to output_dir/best/step_<N>/; the one a checkpoint's trainer
state names is kept until a newer checkpoint names another, so a run resumed from that checkpoint still finds it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import selora
from recipes.checkpoint import STEP_DIR, CheckpointError, TrainerState
from selora.distributed import world

BEST_DIR = "best"


class BestEval:
    def __init__(self, output_dir: str | Path, patience: int, min_delta: float, keep_adapter: bool,
                 state: TrainerState):
        """``state``: the trainer state the run starts from (fresh or resumed)."""
        self.directory = Path(output_dir) / BEST_DIR
        self.patience, self.min_delta, self.keep_adapter = int(patience), float(min_delta), keep_adapter
        self.checkpointed_best = state.best_step  # named by the checkpoint this run resumed from (if any)

    def record(self, state: TrainerState, eval_loss: float, model, srlora) -> bool:
        """Take the evaluation at ``state.step``; True when it improved on the best by more than min_delta (then
        the adapter is kept, with export_best). Every rank must call it (saving the adapter is a collective)."""
        improved = state.best_eval_loss is None or eval_loss < state.best_eval_loss - self.min_delta
        if not improved:
            state.evals_without_improvement += 1
            return False
        state.best_eval_loss, state.best_step, state.evals_without_improvement = eval_loss, state.step, 0
        if self.keep_adapter:
            selora.save_adapter(model, self.adapter_dir(state.step),
                                extra_state=srlora.state_dict() if srlora else None,
                                extra_meta={"step": state.step, "eval_loss": eval_loss})
            self._prune(keep={state.step, self.checkpointed_best})
        return True

    def checkpointed(self, state: TrainerState) -> None:
        """A checkpoint of ``state`` was saved: the best adapters it does not name are no longer needed."""
        self.checkpointed_best = state.best_step
        if self.keep_adapter:
            self._prune(keep={state.best_step})

    def should_stop(self, state: TrainerState) -> bool:
        return self.patience > 0 and state.evals_without_improvement >= self.patience

    def restore(self, state: TrainerState, model, srlora) -> Path | None:
        """With export_best: load the best step's adapter (and SRLoRA state) into ``model`` for the final export;
        returns its directory (None without export_best or without any evaluation). Every rank must call it."""
        if not self.keep_adapter or state.best_step is None:
            return None
        directory = self.adapter_dir(state.best_step)
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is missing: the adapter of the best evaluation (step "
                                  f"{state.best_step}) cannot be exported; export the last one with "
                                  "train.export_best=false")
        extra = selora.load_adapter(model, directory)
        if srlora is not None and extra:
            srlora.load_state_dict(extra)
        return directory

    def adapter_dir(self, step: int) -> Path:
        return self.directory / f"step_{step}"

    def _prune(self, keep: set) -> None:
        if world()[0] != 0 or not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            match = STEP_DIR.fullmatch(path.name)
            if match and int(match.group(1)) not in keep:
                shutil.rmtree(path, ignore_errors=True)
