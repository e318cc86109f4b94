"""Find target modules, validate everything, then swap them for adapter layers and freeze the rest.

All checks run before the first swap, so a bad config leaves the model exactly as it was.
"""
from __future__ import annotations

import re
import zlib

import torch
from torch import nn

from . import quant
from .config import LoRAConfig
from .decode import ModelDecoder
from .factors import SpectralFactor
from .layers import AdapterLinear
from .svd import sharded_principal_directions


class TargetModuleError(ValueError):
    """target_modules names nothing, or something selora cannot wrap; the message lists what exists."""


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _linear_leaf_names(model: nn.Module) -> list[str]:
    names = set()
    for name, module in model.named_modules():
        try:
            quant.base_kind(module)
        except TypeError:
            continue
        names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def find_targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    """Modules to adapt, by full name. Raises TargetModuleError if a pattern matches nothing or a
    matched module is not a linear layer, or if the rank does not fit a matched layer."""
    targets: dict[str, nn.Module] = {}
    unmatched = []
    for pattern in config.target_modules:
        hits = {name: m for name, m in model.named_modules() if name and _matches(name, pattern)}
        if not hits:
            unmatched.append(pattern)
        targets.update(hits)
    if unmatched:
        raise TargetModuleError(
            f"target_modules {unmatched} match no module of {type(model).__name__}; linear layers it has: "
            f"{_linear_leaf_names(model)}")
    for name, module in targets.items():
        if isinstance(module, AdapterLinear):
            raise TargetModuleError(f"{name} already has a selora adapter; apply() once per model")
        try:
            quant.base_kind(module)
        except TypeError as error:
            raise TargetModuleError(f"{name}: {error}") from None
        limit = min(module.in_features, module.out_features)
        if config.r > limit:
            raise TargetModuleError(
                f"r={config.r} is larger than {name}'s smallest dimension ({module.in_features}x{module.out_features} -> "
                f"max rank {limit}); lower r or drop this module from target_modules")
    return targets


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A generator per layer, keyed by seed and module name: init does not depend on the order of layers."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """Adapter layers by the *base model's* module name (as PEFT and the state dict know it)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


def apply(model: nn.Module, config: LoRAConfig, *, initialize: bool = True) -> nn.Module:
    """Attach adapters to ``model`` in place and return it; only adapter parameters stay trainable.

    initialize=False skips data-dependent init (PiSSA SVD, DoRA magnitudes) — used on the meta device
    and when the caller (e.g. the ZeRO-3 sharded initialiser) runs it itself.
    """
    targets = find_targets(model, config)
    quant.keep_4bit_layout(model)  # bitsandbytes' CPU eval layout would change the bases between train and eval
    index_sets: dict = {}  # one shared index set per SeLoRA factor shape (the paper's Omega)
    layers = {name: AdapterLinear(base, config, layer_generator(config.seed, name), index_sets)
              for name, base in targets.items()}
    for param in model.parameters():
        param.requires_grad_(False)
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    model.selora_config = config
    factors = [f for layer in layers.values() for f in (layer.lora_A, layer.lora_B) if isinstance(f, SpectralFactor)]
    if factors:
        ModelDecoder(factors).attach(model)
    on_meta = any(layer.base_layer.weight.device.type == "meta" for layer in layers.values())
    if initialize and not on_meta:
        initialize_adapters(model)
    return model


@torch.no_grad()
def initialize_adapters(model: nn.Module, svd_method: str | None = None) -> dict:
    """Data-dependent init: PiSSA directions (if configured; the SVDs spread over ranks under ZeRO; ``svd_method``
    defaults to the config's ``init_svd``), then DoRA magnitudes. Every rank must call it. Returns SVD statistics
    ({"computed_here": n, "owners": ...})."""
    config: LoRAConfig = model.selora_config
    svd_method = svd_method or config.init_svd
    layers = adapter_layers(model)
    stats = {"computed_here": 0, "owners": {}}
    if config.init == "pissa":
        directions, stats = sharded_principal_directions(layers, {n: l.r for n, l in layers.items()},
                                                         method=svd_method, seed=config.seed)
        for name, layer in layers.items():
            layer.initialize_from_principal_directions(directions[name])
    for layer in layers.values():
        layer.initialize_magnitude()
    return stats


def merge(model: nn.Module) -> None:
    """Write every adapter into its base weight; the model then computes as a plain model (no decoding)."""
    for layer in adapter_layers(model).values():
        layer.merge()
    if getattr(model, "selora_decoder", None) is not None:
        model.selora_decoder.merged = True


def unmerge(model: nn.Module) -> None:
    if getattr(model, "selora_decoder", None) is not None:
        model.selora_decoder.merged = False
    for layer in adapter_layers(model).values():
        layer.unmerge()


def count_parameters(model: nn.Module) -> dict:
    """Trainable / total parameter counts, and trainable counts per adapter module type (e.g. "q_proj").

    Works on a model built on the meta device (nothing is allocated). For 4-bit bases the packed storage is
    counted as 2 parameters per byte, whatever dtype stores the bytes (uint8, or bf16 as transformers loads
    checkpoints), so totals stay comparable with the unquantized model.
    """
    numel = quant.parameter_count
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    per_type: dict[str, int] = {}
    for name, layer in adapter_layers(model).items():
        kind = name.rsplit(".", 1)[-1]
        per_type[kind] = per_type.get(kind, 0) + sum(numel(p) for p in layer.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "per_module_type": per_type,
            "trainable_percent": 100.0 * trainable / max(total, 1)}


def parameter_table(model: nn.Module) -> str:
    """A printable table of trainable parameters per adapted module type."""
    counts = count_parameters(model)
    rows = [("module type", "trainable params")] + [(k, f"{v:,}") for k, v in counts["per_module_type"].items()]
    rows += [("total trainable", f"{counts['trainable']:,}"),
             ("all parameters", f"{counts['total']:,}"),
             ("trainable %", f"{counts['trainable_percent']:.4f}")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>16}" for a, b in rows)
