"""Adapter files: selora's own format (save/load, exact round trip) and HF PEFT's LoRA format (export).

selora format, one directory:
  adapter_config.json        {"format": "selora-adapter", "version": 1, "adapter": <config>, "layers": {...}}
  adapter_model.safetensors  per layer: trainable tensors and the base-delta record; once per SeLoRA factor
                             shape: its shared index set, as a packed bit mask ("index_sets.<basis>.<rows>x<length>")
  extra_state.safetensors    optional caller state (e.g. SRLoRA scores), saved beside the adapter
Directories are written to a temporary sibling and renamed into place, so a crash mid-save never leaves a
half-written adapter where a good one was. Under ZeRO-3 every rank must call save/export (gathering is
collective); rank 0 alone writes.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoRAConfig
from .distributed import full_value, gathered, set_full_value, world
from .inject import adapter_layers, apply, find_targets
from .decode import IndexSet
from .factors import SpectralFactor
from .layers import AdapterLinear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EXTRA_FILE = "extra_state.safetensors"
FORMAT = "selora-adapter"
# 2: SeLoRA entries are 1-D with one index set per factor shape (selora 0.2); 1: per-row coefficients and locations.
VERSION = 2


# The low-rank records of what selora wrote into (or beside) the base; see AdapterLinear.
RECORDS = ("base_delta_A", "base_delta_B", "base_delta_chunks", "residual_A", "residual_B")


class AdapterFileError(ValueError):
    """An adapter directory is missing, incomplete, corrupt, or does not fit the model."""


# ----- writing helpers ---------------------------------------------------------------------------------
def write_directory_atomically(directory: str | Path, write) -> Path:
    """Call ``write(tmp_dir)`` then move tmp_dir to ``directory``, replacing an existing one only at the end."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not tempfile.mkdtemp, which makes it 0700) so the directory gets the user's umask like any other.
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _layer_state(layer: AdapterLinear) -> dict[str, torch.Tensor]:
    """A layer's adapter tensors, whole (gathered under ZeRO-3), as CPU copies."""
    with gathered(list(layer.lora_A.parameters()) + list(layer.lora_B.parameters())
                  + ([layer.magnitude] if layer.magnitude is not None else [])):
        state = {f"lora_A.{k}": v.detach().cpu().clone() for k, v in layer.lora_A.state_dict().items()}
        state.update({f"lora_B.{k}": v.detach().cpu().clone() for k, v in layer.lora_B.state_dict().items()})
        if layer.magnitude is not None:
            state["magnitude"] = layer.magnitude.detach().cpu().clone()
    for key in RECORDS:  # empty records are left out (absent = empty): their headers would be most of a small file
        if getattr(layer, key).numel():
            state[key] = getattr(layer, key).detach().cpu().clone()
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor keyed ``<module name>.<tensor>``; identical in single-process and ZeRO-3 runs."""
    state = {}
    for name, layer in adapter_layers(model).items():
        state.update({f"{name}.{k}": v for k, v in _layer_state(layer).items()})
    return state


def _layer_meta(model: nn.Module, index_keys: dict[int, str]) -> dict:
    meta = {}
    for name, layer in adapter_layers(model).items():
        meta[name] = {"in_features": layer.in_features, "out_features": layer.out_features, "base": layer.kind}
        for side, factor in (("A", layer.lora_A), ("B", layer.lora_B)):
            if isinstance(factor, SpectralFactor):
                meta[name][f"index_set_{side}"] = index_keys[id(factor.index_set)]
    return meta


def index_set_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[int, str], dict]:
    """Every distinct index set of the model's SeLoRA factors once (normally one per factor shape), as packed
    bit masks: (tensors by key, key by id(IndexSet), meta by key)."""
    tensors, keys, meta = {}, {}, {}
    for layer in adapter_layers(model).values():
        for factor in (layer.lora_A, layer.lora_B):
            if not isinstance(factor, SpectralFactor) or id(factor.index_set) in keys:
                continue
            index_set = factor.index_set
            key = base = f"index_sets.{index_set.basis}.{index_set.rows}x{index_set.length}"
            number = 1
            while key in tensors:  # a shape with more than one set (loaded from a selora < 0.2 file)
                key, number = f"{base}.{number}", number + 1
            tensors[key], keys[id(index_set)] = index_set.mask(), key
            meta[key] = {"basis": index_set.basis, "rows": index_set.rows, "length": index_set.length,
                         "count": index_set.count, "sha256": index_set.digest()}
    return tensors, keys, meta


def save_adapter(model: nn.Module, directory: str | Path, extra_state: dict[str, torch.Tensor] | None = None,
                 extra_meta: dict | None = None) -> Path:
    """Write the adapter of ``model`` (after `selora.apply`) to ``directory``; returns the path."""
    layers = adapter_layers(model)
    if not layers:
        raise AdapterFileError("this model has no selora adapters to save; call selora.apply(model, config) first")
    tensors = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    masks, index_keys, index_meta = index_set_tensors(model)
    tensors.update(masks)
    extra = {k: v.detach().cpu().contiguous() for k, v in (extra_state or {}).items()}
    meta = {"format": FORMAT, "version": VERSION, "adapter": model.selora_config.to_dict(),
            "layers": _layer_meta(model, index_keys), "index_sets": index_meta, "extra": extra_meta or {}}
    if world()[0] != 0:
        return Path(directory)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        if extra:
            save_file(extra, str(tmp / EXTRA_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    return write_directory_atomically(directory, write)


# ----- reading -----------------------------------------------------------------------------------------
def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(meta, tensors, extra tensors) from an adapter directory, with a clear error for each way it can be bad."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {str(directory)!r} does not exist; pass the directory that "
                               "save_adapter wrote (it holds adapter_config.json)")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterFileError(f"{path} is missing: {directory} is not a complete selora adapter "
                                   "(was the save interrupted? use the previous checkpoint)")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFileError(f"{config_path} is not valid JSON ({error}); the file is corrupt") from None
    if meta.get("format") != FORMAT:
        hint = " (this looks like a PEFT adapter: load it with peft.PeftModel.from_pretrained)" if "peft_type" in meta else ""
        raise AdapterFileError(f"{config_path} is not a selora adapter config{hint}")
    try:
        tensors = load_file(str(weights_path))
        extra_path = directory / EXTRA_FILE
        extra = load_file(str(extra_path)) if extra_path.is_file() else {}
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(f"{weights_path} cannot be read ({error}); the file is corrupt or truncated") from None
    return meta, tensors, extra


def _check_fits(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every saved layer exists in ``model`` with the same shape, and every tensor is present."""
    for name, info in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterFileError(f"adapter layer {name!r} does not exist in {type(model).__name__}; "
                                   "this adapter was trained on a different model architecture") from None
        shape = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if shape != (info["in_features"], info["out_features"]):
            raise AdapterFileError(
                f"adapter layer {name!r} expects in={info['in_features']}, out={info['out_features']} but the model's "
                f"module has in={shape[0]}, out={shape[1]}; load it on the model it was trained for")
        for pair in (("base_delta_A", "base_delta_B"), ("residual_A", "residual_B")):
            present = [f"{name}.{key}" in tensors for key in pair]
            if any(present) and not all(present):
                missing = pair[present.index(False)]
                raise AdapterFileError(f"{WEIGHTS_FILE} lacks tensor {name}.{missing}; the file is incomplete")


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | Path) -> dict[str, torch.Tensor]:
    """Load an adapter saved by `save_adapter` into ``model`` and return its extra state.

    ``model`` is either the *original* base model (the adapter is applied first, with the saved config)
    or a model already given the same config by `selora.apply`. Nothing is changed unless everything fits.
    """
    meta, tensors, extra = read_adapter(directory)
    if meta.get("version", 1) == 1:
        meta, tensors = _upgrade_version_1(meta, tensors)
    config = LoRAConfig.from_dict(meta["adapter"])
    _check_fits(model, meta, tensors)
    layers = adapter_layers(model)
    if layers:
        merged = [name for name, layer in layers.items() if layer.merged]
        if merged:  # new factors under a merged base would be ignored, and unmerge would subtract the wrong delta
            raise AdapterFileError(f"{len(merged)} adapter layers (e.g. {merged[0]}) are merged into the base; "
                                   "call selora.unmerge(model) before load_adapter")
        if model.selora_config.to_dict() != config.to_dict():
            raise AdapterFileError(f"the model's adapters were applied with {model.selora_config.to_dict()} but "
                                   f"{directory} holds {config.to_dict()}; load onto the base model instead")
    # Compare with the layers the config adapts *before* apply(), so a mismatch leaves the model untouched.
    adapted = set(layers) if layers else set(find_targets(model, config))
    if adapted != set(meta["layers"]):
        only_model, only_file = sorted(adapted - set(meta["layers"]))[:5], sorted(set(meta["layers"]) - adapted)[:5]
        raise AdapterFileError(f"{directory} does not cover the modules its config adapts in this model: "
                               f"adapted but not in the file {only_model}, in the file but not adapted {only_file}; "
                               "load it on the model it was trained for")
    if not layers:
        apply(model, config)
        layers = adapter_layers(model)
    index_sets = _read_index_sets(meta, tensors, layers)
    for name, layer in layers.items():
        _load_layer(layer, {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")},
                    meta["layers"][name], name)
        for side, factor in (("A", layer.lora_A), ("B", layer.lora_B)):
            if isinstance(factor, SpectralFactor):
                factor.index_set = index_sets[meta["layers"][name][f"index_set_{side}"]]
    return extra


def _read_index_sets(meta: dict, tensors: dict[str, torch.Tensor], layers: dict[str, AdapterLinear]) -> dict:
    """IndexSet by file key. A set equal to the one the model drew from its seed stays the model's own object
    (so batching and memory are unchanged); a different one (a file from another seed rule) is used as stored."""
    drawn = {}
    for layer in layers.values():
        for factor in (layer.lora_A, layer.lora_B):
            if isinstance(factor, SpectralFactor):
                drawn.setdefault(factor.index_set.digest(), factor.index_set)
    sets = {}
    for key, info in meta.get("index_sets", {}).items():
        if key not in tensors:
            raise AdapterFileError(f"{WEIGHTS_FILE} lacks tensor {key} (a SeLoRA index set); the file is incomplete")
        loaded = IndexSet.from_mask(info["basis"], info["rows"], info["length"], tensors[key])
        if loaded.count != info["count"] or loaded.digest() != info["sha256"]:
            raise AdapterFileError(f"{key} in {WEIGHTS_FILE} does not match its recorded count/hash; the file is corrupt")
        sets[key] = drawn.get(loaded.digest(), loaded)
    return sets


def _upgrade_version_1(meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter saved by selora < 0.2 (per-row coefficients (r, K) and locations (r, K) per factor) in
    today's layout: flat entries and one index set per distinct set of locations."""
    from .bases import canonical, get

    adapter = dict(meta["adapter"])
    if adapter.get("method") != "selora":
        return {**meta, "version": VERSION}, tensors
    basis_name = canonical(adapter.get("basis", "dct"))  # the old names: selora.bases.ALIASES
    basis = get(basis_name)
    tensors, layers, index_meta, by_digest = dict(tensors), {}, {}, {}
    for name, info in meta["layers"].items():
        info = dict(info)
        for side, length in (("A", info["in_features"]), ("B", info["out_features"])):
            coefficients = tensors.pop(f"{name}.lora_{side}.coefficients", None)
            locations = tensors.pop(f"{name}.lora_{side}.locations", None)
            if coefficients is None or locations is None:
                raise AdapterFileError(f"{WEIGHTS_FILE} lacks {name}.lora_{side}.coefficients/locations; "
                                       "the file is incomplete")
            rows, n_cols = coefficients.shape[0], basis.spectral_shape(coefficients.shape[0], length)[1]
            flat = (locations.long() + n_cols * torch.arange(rows).unsqueeze(1)).reshape(-1)
            order = flat.argsort()
            index_set = IndexSet(basis_name, rows, length, flat[order])
            key = by_digest.setdefault(index_set.digest(), f"index_sets.{basis_name}.{rows}x{length}.{len(by_digest)}")
            tensors[key] = index_set.mask()
            index_meta[key] = {"basis": basis_name, "rows": rows, "length": length, "count": index_set.count,
                               "sha256": index_set.digest()}
            tensors[f"{name}.lora_{side}.coefficients"] = coefficients.reshape(-1)[order].contiguous()
            info[f"index_set_{side}"] = key
        layers[name] = info
    return {**meta, "version": VERSION, "layers": layers, "index_sets": index_meta}, tensors


def _load_layer(layer: AdapterLinear, state: dict[str, torch.Tensor], info: dict, name: str) -> None:
    # The tensors themselves (not state_dict() copies): under ZeRO-3 only they know their full shape.
    own = {f"{prefix}.{key}": tensor for prefix, factor in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B))
           for key, tensor in [*factor.named_parameters(), *factor.named_buffers()]}
    if layer.magnitude is not None:
        own["magnitude"] = layer.magnitude
    for key, target in own.items():
        if key not in state:
            raise AdapterFileError(f"{WEIGHTS_FILE} lacks tensor {name}.{key}; the file is incomplete")
        shape = tuple(getattr(target, "ds_shape", target.shape))
        if tuple(state[key].shape) != shape:
            raise AdapterFileError(f"{name}.{key} has shape {tuple(state[key].shape)} in the file but "
                                   f"{shape} in the model")
    for key, target in own.items():
        value = state[key].to(target.device)
        if isinstance(target, torch.nn.Parameter):
            set_full_value(target, value)  # ZeRO shard and optimizer master copy too, when there are any
        else:
            target.copy_(value.to(target.dtype))
    empty = {"base_delta_A": layer.base_delta_A[:0], "base_delta_B": layer.base_delta_B[:, :0],
             "residual_A": layer.residual_A[:0], "residual_B": layer.residual_B[:, :0]}
    state = {**{k: v.cpu() for k, v in empty.items()}, **state}
    layer.residual_A = state["residual_A"].to(layer.residual_A)
    layer.residual_B = state["residual_B"].to(layer.residual_B)
    _rebase(layer, state["base_delta_A"], state["base_delta_B"], state.get("base_delta_chunks"))


def _rebase(layer: AdapterLinear, saved_A: torch.Tensor, saved_B: torch.Tensor, chunks: torch.Tensor | None) -> None:
    """Make the base hold W0 + the saved record. When what apply() wrote is a prefix of the record (the usual
    case: the same PiSSA init, then SRLoRA fusions), the remaining changes are replayed chunk by chunk, exactly
    as training applied them, so the resumed base is bit-identical to the uninterrupted one."""
    have = layer.base_delta_A.shape[0]
    chunks = [int(c) for c in chunks] if chunks is not None and chunks.numel() else [saved_A.shape[0]]
    # An empty record must replay nothing: a zero-width change still re-quantizes a 4/8-bit base.
    chunks = [c for c in chunks if c > 0]
    prefix = (have <= saved_A.shape[0] and torch.equal(saved_A[:have], layer.base_delta_A.cpu())
              and torch.equal(saved_B[:, :have], layer.base_delta_B.cpu()))
    if not prefix:  # undo what apply() wrote, then replay everything
        layer.record_base_change(-layer.base_delta_B.clone(), layer.base_delta_A.clone())
        layer.base_delta_A = layer.base_delta_A[:0]
        layer.base_delta_B = layer.base_delta_B[:, :0]
        layer.base_delta_chunks = layer.base_delta_chunks[:0]
        have = 0
    start = 0
    for width in chunks:
        if start >= have:
            layer.record_base_change(saved_B[:, start:start + width], saved_A[start:start + width])
        start += width


# ----- PEFT export -------------------------------------------------------------------------------------
@torch.no_grad()
def export_lora(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None,
                task_type: str | None = "auto") -> Path:
    """Write the adapter as a plain HF PEFT LoRA (adapter_config.json + adapter_model.safetensors).

    The exported update is the whole change relative to the *pretrained* base: the decoded factors plus any
    PiSSA residual or SRLoRA fusion selora wrote into the base. Scaling is folded into B (lora_alpha = r);
    layers with fewer directions are zero-padded to one common rank, which changes no output.
    """
    layers = adapter_layers(model)
    if not layers:
        raise AdapterFileError("this model has no selora adapters to export; call selora.apply first")
    config: LoRAConfig = model.selora_config
    factors = {}
    for name, layer in layers.items():
        A, B = layer.factor_matrices()
        magnitude = full_value(layer.magnitude).cpu() if layer.magnitude is not None else None
        A_all = torch.cat([A.cpu(), layer.base_delta_A.float().cpu(), layer.residual_A.float().cpu()], dim=0)
        B_all = torch.cat([layer.scaling * B.cpu(), layer.base_delta_B.float().cpu(), layer.residual_B.float().cpu()], dim=1)
        factors[name] = (A_all, B_all, magnitude)
    rank = max(A.shape[0] for A, _, _ in factors.values())
    tensors = {}
    for name, (A, B, magnitude) in factors.items():
        pad = rank - A.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.cat([A, A.new_zeros(pad, A.shape[1])]).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1).contiguous()
        if magnitude is not None:
            tensors[f"base_model.model.{name}.lora_magnitude_vector"] = magnitude.contiguous()
    if task_type == "auto":
        task_type = "CAUSAL_LM" if hasattr(model, "generate") and hasattr(model, "config") else None
    peft_config = {
        "peft_type": "LORA", "task_type": task_type, "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": sorted(layers), "bias": "none", "use_rslora": False, "use_dora": config.use_dora,
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base_model_name_or_path,
    }
    if world()[0] != 0:
        return Path(directory)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))

    return write_directory_atomically(directory, write)
