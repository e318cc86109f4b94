"""Checkpoints (atomic save, verified load, pruning) and the final exports of a run; which checkpoint to
resume from is recipes/resume.py's decision.

Layout under ``output_dir``:
    checkpoints/
      latest                  "step_8": the newest *complete* checkpoint; replaced (os.replace) only after
                              every rank finished writing, so a kill mid-save leaves the previous one valid
      step_4/ step_8/         the last two checkpoints; older ones are deleted once the pointer has moved
        engine/               optimizer + scheduler: engine_state.pt (plain PyTorch) or DeepSpeed's files
        adapter/              selora.save_adapter (SRLoRA scores and used directions in extra_state)
        trainer_state.json    step, data position, best eval loss, RNG states of every rank, the settings the
                              run was trained with (model, quantization, adapter, SRLoRA), and a manifest of
                              every file above with its size and sha256 (written last; checked on resume)
    adapter/  peft_adapter/  merged/      the final exports (see `export_final`)

A step directory that `latest` does not name (a save that died half-way) is never read and is deleted by
the next successful save. A checkpoint whose files do not match its manifest is never resumed: the newest
valid older one is named (or, with train.resume=auto, used after one warning line). All ranks must call `save_checkpoint` and `load_checkpoint` (DeepSpeed's and
selora's saves are collectives); rank 0 writes the shared files, so ``output_dir`` must be one filesystem
seen by every rank.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import selora
from selora.distributed import world

CHECKPOINTS_DIR = "checkpoints"
POINTER_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
ENGINE_DIR = "engine"
ADAPTER_DIR = "adapter"
KEEP_CHECKPOINTS = 2
STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint named by train.resume is missing, incomplete or does not fit this run."""


@dataclass
class TrainerState:
    """Where training stands after ``step`` optimizer steps.

    epoch / batch_in_epoch: the data position, in micro-batches of this rank's shard of the epoch's order;
    the next micro-batch is number ``batch_in_epoch`` (0-based) of ``epoch``.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None  # the step of best_eval_loss (recipes/best_eval.py)
    evals_without_improvement: int = 0  # evaluations since then: early stopping's count
    world_size: int = 1
    rng: list[dict] = field(default_factory=list)  # one entry per rank


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----- RNG states (JSON-able) ----------------------------------------------------------------------------------
def _bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """This process's python / numpy / torch (and CUDA) generator states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": _bytes(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = _bytes(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor(state["cuda"]))


def _gather_rng_states() -> list[dict]:
    rank, world_size = world()
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


# ----- saving --------------------------------------------------------------------------------------------------
def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a reader (or a kill)
    sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(step_dir: Path) -> dict[str, dict]:
    """{relative path: {"size": bytes, "sha256": hex}} of every file of a checkpoint but trainer_state.json."""
    return {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != TRAINER_STATE_FILE}


def read_pointer(directory: Path) -> Path | None:
    """The step directory that ``directory/latest`` names, or None when there is no pointer."""
    pointer = directory / POINTER_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not STEP_DIR.fullmatch(name):
        raise CheckpointError(f"{pointer} holds {name!r}, not a checkpoint name like 'step_8'; the file is corrupt "
                              "(delete it to start fresh, or point train.resume at a step directory)")
    return directory / name


def save_checkpoint(output_dir: str | Path, engine, model: torch.nn.Module, srlora, state: TrainerState,
                    settings: dict | None = None) -> Path:
    """Write checkpoints/step_<state.step>/ and then move `latest` to it. Every rank must call it.
    ``settings`` (see `run_settings`) is recorded so that a resume with other settings is refused."""
    rank, world_size = world()
    directory = checkpoints_dir(output_dir)
    step_dir = directory / f"step_{state.step}"
    if rank == 0:
        if step_dir.exists():  # a leftover of a save that died before its pointer moved
            shutil.rmtree(step_dir)
        step_dir.mkdir(parents=True)
    _barrier()
    engine.save(step_dir / ENGINE_DIR)
    selora.save_adapter(model, step_dir / ADAPTER_DIR, extra_state=srlora.state_dict() if srlora else None,
                        extra_meta={"step": state.step})
    state.rng = _gather_rng_states()
    state.world_size = world_size
    _barrier()  # every rank's files are on disk before the pointer may name them
    if rank == 0:
        record = {**asdict(state), "settings": settings or {}, "files": _manifest(step_dir)}
        write_text_atomically(step_dir / TRAINER_STATE_FILE, json.dumps(record))
        previous = read_pointer(directory)
        write_text_atomically(directory / POINTER_FILE, step_dir.name + "\n")
        keep = {step_dir.name} | ({previous.name} if previous is not None else set())
        for old in directory.iterdir():
            if old.is_dir() and STEP_DIR.fullmatch(old.name) and old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return step_dir


# ----- reading ---------------------------------------------------------------------------------------------------
def validate_checkpoint(step_dir: Path) -> dict:
    """The trainer state of a complete, intact checkpoint; CheckpointError naming the first file that is missing
    or whose size or sha256 differs from the manifest written when it was saved."""
    state_path = step_dir / TRAINER_STATE_FILE
    if not step_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {step_dir} does not exist (a pointer names it, or train.resume "
                              "does)")
    if not state_path.is_file():
        raise CheckpointError(f"{state_path} is missing: {step_dir} is not a complete checkpoint (its save did not "
                              "finish)")
    try:
        record = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{state_path} is not valid JSON ({error}); the checkpoint is corrupt") from None
    for name, entry in record["files"].items():
        entry = entry if isinstance(entry, dict) else {"size": entry}  # manifests before checksums: size only
        path = step_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: checkpoint {step_dir} is incomplete")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes but was saved with {entry['size']}: "
                                  f"checkpoint {step_dir} is truncated or was replaced")
        if "sha256" in entry and sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path} does not match the sha256 recorded when it was saved: checkpoint "
                                  f"{step_dir} is corrupt")
    return record


def load_checkpoint(step_dir: Path, engine, model: torch.nn.Module, srlora) -> TrainerState:
    """Restore engine, adapter (with the base changes it recorded), SRLoRA and this rank's RNG from
    ``step_dir`` (checked by `plan_resume`); returns where training stands. Every rank must call it; call it
    right before the loop."""
    record = json.loads((step_dir / TRAINER_STATE_FILE).read_text())
    rank, world_size = world()
    if record["world_size"] != world_size:
        raise CheckpointError(f"{step_dir} was saved by {record['world_size']} ranks but this run has {world_size}: "
                              "the data position and optimizer shards are per rank; resume with the same number")
    engine.load(step_dir / ENGINE_DIR)
    extra = selora.load_adapter(model, step_dir / ADAPTER_DIR)
    if srlora is not None:
        if not extra:
            raise CheckpointError(f"{step_dir / ADAPTER_DIR} holds no SRLoRA state but srlora.enabled=true: this "
                                  "checkpoint comes from a run without SRLoRA")
        srlora.load_state_dict(extra)
    known = {f.name for f in fields(TrainerState)}
    state = TrainerState(**{k: v for k, v in record.items() if k in known})
    set_rng_state(state.rng[rank])
    return state


# ----- final exports -------------------------------------------------------------------------------------------
def merged_state_dict(state: dict[str, torch.Tensor], adapter_names: list[str]) -> dict[str, torch.Tensor]:
    """A model state dict with merged adapter layers turned back into the base model's keys:
    ``<layer>.base_layer.<k>`` -> ``<layer>.<k>``; the adapter's own tensors are dropped."""
    out = {}
    for key, value in state.items():
        layer = next((n for n in adapter_names if key.startswith(n + ".")), None)
        if layer is None:
            out[key] = value
        elif key.startswith(layer + ".base_layer."):
            out[layer + "." + key[len(layer) + len(".base_layer."):]] = value
    return out


def export_final(output_dir: str | Path, engine, model: torch.nn.Module, srlora, *, export_peft: bool,
                 save_merged: bool, base_model_name_or_path: str | None, tokenizer=None,
                 base_model: dict | None = None) -> dict[str, Path]:
    """Write output_dir/adapter (selora), peft_adapter (PEFT LoRA) and merged (save_pretrained of base +
    adapter); returns {kind: path}. Every rank must call it; merging changes ``model``, so call it last.
    ``base_model`` ({"path"} or {"preset", "seed"}) is recorded in the selora adapter for launch/evaluate.py."""
    output_dir = Path(output_dir)
    rank = world()[0]
    paths = {"adapter": selora.save_adapter(model, output_dir / "adapter",
                                            extra_state=srlora.state_dict() if srlora else None,
                                            extra_meta={"base_model": base_model} if base_model else None)}
    if export_peft:
        paths["peft_adapter"] = selora.export_lora(model, output_dir / "peft_adapter",
                                                   base_model_name_or_path=base_model_name_or_path)
    if save_merged:
        names = list(selora.adapter_layers(model))
        selora.merge(model)
        state = merged_state_dict(engine.full_state_dict(), names)
        paths["merged"] = output_dir / "merged"
        if rank == 0:
            for name in names:  # the module tree the saved config describes: plain base layers again
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, model.get_submodule(name).base_layer)
            model.save_pretrained(paths["merged"], state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(paths["merged"])
    _barrier()
    return paths
