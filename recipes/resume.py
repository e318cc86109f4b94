"""Which checkpoint a run continues from, decided before anything is loaded: train.resume (auto, never, or a
path), the output directory's previous run (kept, refused, or cleared by train.overwrite), and the checks that
the checkpoint is intact, was trained with the same settings and ranks, and has steps left. Reading and writing
checkpoints is recipes/checkpoint.py's job."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from recipes.checkpoint import (CHECKPOINTS_DIR, STEP_DIR, CheckpointError, _barrier, checkpoints_dir, read_pointer,
                                validate_checkpoint)
from selora.distributed import world

# What a run leaves in output_dir; train.overwrite=true removes exactly these, never anything else of the user's.
RUN_FILES = (CHECKPOINTS_DIR, "adapter", "peft_adapter", "merged", "metrics.jsonl", "tensorboard", "config.yaml",
             "run_info.json", "best", "wandb", "mlflow.db", "mlartifacts")


def run_settings(cfg) -> dict:
    """What a checkpoint must share with the run that resumes it: the base model (path, or preset and seed),
    its quantization, and every adapter and SRLoRA setting. Plain values, recorded in trainer_state.json."""
    model = cfg.model
    base = {"path": model.path} if model.path else {"preset": model.preset, "seed": model.seed}
    base["quantization"] = model.quantization
    if model.quantization == "4bit":
        base["bnb_4bit_quant_type"] = model.bnb_4bit_quant_type
    from omegaconf import OmegaConf
    return {"model": base, "adapter": OmegaConf.to_container(cfg.adapter, resolve=True),
            "srlora": OmegaConf.to_container(cfg.srlora, resolve=True)}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def library_defaults() -> dict:
    """``section.key: default`` of every adapter and SRLoRA setting (the library's dataclass fields)."""
    import dataclasses

    import selora
    defaults = {}
    for section, classes in (("adapter", tuple(selora.ADAPTER_METHODS.values())), ("srlora", (selora.SRLoRAConfig,))):
        for cls in classes:
            for f in dataclasses.fields(cls):
                if f.default is not dataclasses.MISSING:
                    defaults.setdefault(f"{section}.{f.name}", f.default)
    return defaults


def setting_differences(recorded: dict, now: dict, defaults: dict | None = None) -> list[str]:
    """``key=checkpoint value (now new value)`` for every setting that differs (keys either side lacks count).
    A key the checkpoint lacks but ``defaults`` has is no difference while it is at that default: a setting added
    after the checkpoint was written, whose default keeps the behaviour the checkpoint was trained with."""
    old, new = _flat(recorded), _flat(now)
    missing = object()
    defaults = defaults or {}
    return [f"{key}={old.get(key, missing)!r} (now {new.get(key, missing)!r})".replace(repr(missing), "unset")
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)
            and not (key not in old and key in defaults and new.get(key, missing) == defaults[key])]


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def plan_resume(cfg, total_steps: int | None = None, settings: dict | None = None) -> Path | None:
    """The step directory this run continues from (None: it starts fresh), checked against what is on disk
    before anything is loaded: output_dir must be a directory; resume=never refuses a directory holding a
    previous run unless train.overwrite=true; a checkpoint must be intact, come from the same settings and the
    same number of ranks, and have steps left (``total_steps``, when known). ``settings``: `run_settings(cfg)`,
when the caller has it already. Raises CheckpointError."""
    train = cfg.train
    output_dir = Path(train.output_dir)
    for path in (output_dir, *output_dir.parents):
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"train.output_dir={str(output_dir)!r}: {str(path)!r} is a file, not a directory; "
                                  "choose another train.output_dir")
    previous = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if train.resume == "never":
        if previous and not train.overwrite:
            raise CheckpointError(
                f"train.output_dir={str(output_dir)!r} already holds files ({', '.join(previous[:4])}"
                f"{', ...' if len(previous) > 4 else ''}) and train.resume=never would replace them; choose a new "
                "train.output_dir, continue it with train.resume=auto, or replace it with train.overwrite=true")
        return None
    step_dir = find_checkpoint(output_dir, train.resume)
    if step_dir is None:
        if "adapter" in previous and not train.overwrite:
            raise CheckpointError(
                f"train.output_dir={str(output_dir)!r} holds a finished run (adapter/) and no checkpoint to resume; "
                "choose a new train.output_dir, or replace it with train.overwrite=true")
        return None
    record = validate_checkpoint(step_dir)
    differences = (setting_differences(record["settings"], settings or run_settings(cfg), library_defaults())
                   if record.get("settings") else [])
    if differences:
        raise CheckpointError(
            f"checkpoint {step_dir} was trained with other settings: {', '.join(differences)}; resume with the "
            "checkpoint's settings, or choose a new train.output_dir (or train.resume=never train.overwrite=true)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if record["world_size"] != world_size:
        raise CheckpointError(f"{step_dir} was saved by {record['world_size']} ranks but this run has {world_size}: "
                              "the data position and optimizer shards are per rank; resume with the same number")
    check_steps_left(step_dir, record["step"], total_steps)
    return step_dir


def check_steps_left(step_dir: Path | None, step: int | None, total_steps: int | None) -> None:
    """CheckpointError when the checkpoint already reached the run's last step (nothing would be trained)."""
    if step_dir is None or total_steps is None:
        return
    if step is None:
        step = validate_checkpoint(step_dir)["step"]
    if step >= total_steps:
        raise CheckpointError(
            f"checkpoint {step_dir} is already at step {step} and this run stops at step {total_steps}: nothing is "
            f"left to train; raise train.max_steps above {step} to continue it, or choose a new train.output_dir")


def clear_previous_run(output_dir: str | Path) -> None:
    """Remove what an earlier run wrote in ``output_dir`` (RUN_FILES only); for train.overwrite=true. Every
    rank must call it (rank 0 removes)."""
    if world()[0] == 0:
        for name in RUN_FILES:
            path = Path(output_dir) / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    _barrier()


def find_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """The step directory to resume from: train.resume = "auto" (the `latest` of this run, if any),
    "never" (None), or a path (a step directory, a checkpoints/ directory, or a run's output_dir).

    A checkpoint that fails `validate_checkpoint` raises CheckpointError naming the bad file and the newest
    valid older checkpoint; under "auto" that older checkpoint is used instead, after one warning line."""
    if resume in (None, "never"):
        return None
    if resume == "auto":
        step_dir = read_pointer(checkpoints_dir(output_dir))
        return None if step_dir is None else _valid_or_older(step_dir, fall_back=True)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"train.resume={resume!r}: no such file or directory; pass a checkpoint directory "
                              "(output_dir/checkpoints/step_N), or resume=auto / resume=never")
    for directory in (path, path / CHECKPOINTS_DIR):
        step_dir = read_pointer(directory)
        if step_dir is not None:
            return _valid_or_older(step_dir, fall_back=False)
    return _valid_or_older(path, fall_back=False)


def _step_of(path: Path) -> int:
    match = STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def older_valid_checkpoint(step_dir: Path) -> Path | None:
    """The newest checkpoint beside ``step_dir`` with a smaller step that passes `validate_checkpoint`."""
    parent, step = step_dir.parent, _step_of(step_dir)
    if not parent.is_dir():
        return None
    for candidate in sorted((p for p in parent.iterdir() if p.is_dir() and -1 < _step_of(p) < step),
                            key=_step_of, reverse=True):
        try:
            validate_checkpoint(candidate)
            return candidate
        except CheckpointError:
            continue
    return None


def _valid_or_older(step_dir: Path, fall_back: bool) -> Path:
    try:
        validate_checkpoint(step_dir)
        return step_dir
    except CheckpointError as error:
        older = older_valid_checkpoint(step_dir)
        if older is None:
            raise CheckpointError(f"{error}; there is no valid older checkpoint: start over with "
                                  "train.resume=never train.overwrite=true") from None
        if not fall_back:
            raise CheckpointError(f"{error}; resume from the newest valid older checkpoint: "
                                  f"train.resume={older}") from None
        if _rank0():
            print(f"warning: {error}; resuming from the newest valid older checkpoint {older}", flush=True)
        return older
