"""bitsandbytes in one place: what kind of base a layer has, its weight as a dense float matrix, and how to
write a new dense weight back (re-quantizing for 4-bit / 8-bit bases).

Every caller that must *see* or *change* a base weight (merge, PiSSA init, SRLoRA fusion) goes through
`dense_weight` and `write_dense_weight`; nothing else in selora touches bitsandbytes internals.
"""
from __future__ import annotations

import torch
from torch import nn

try:  # bitsandbytes is a hard dependency, but keep plain-PyTorch use importable without it.
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
except ImportError:  # pragma: no cover - exercised only where bitsandbytes is absent
    bnb = None
    bnb_functional = None


def base_kind(layer: nn.Module) -> str:
    """"linear", "4bit" or "8bit"; raises TypeError for layers selora cannot wrap."""
    if bnb is not None and isinstance(layer, bnb.nn.Linear4bit):
        return "4bit"
    if bnb is not None and isinstance(layer, bnb.nn.Linear8bitLt):
        return "8bit"
    if isinstance(layer, nn.Linear):
        return "linear"
    raise TypeError(f"cannot wrap {type(layer).__name__}: selora adapts nn.Linear, bnb.nn.Linear4bit and "
                    "bnb.nn.Linear8bitLt layers; remove this module from target_modules")


def _int8_parts(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    # Linear8bitLt moves CB/SCB from the weight into layer.state on its first forward.
    weight = layer.weight
    if getattr(weight, "SCB", None) is not None:
        return weight.CB if weight.CB is not None else weight.data, weight.SCB
    return layer.state.CB, layer.state.SCB


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as a dense (out, in) float32 tensor (a copy for quantized bases)."""
    kind = base_kind(layer)
    if kind == "4bit":
        return bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    if kind == "8bit":
        codes, row_scale = _int8_parts(layer)
        return codes.float() * (row_scale.float().unsqueeze(1) / 127.0)
    return layer.weight.data.float()


def write_dense_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Replace the base weight by ``weight`` (out, in); quantized bases are re-quantized with their settings."""
    kind = base_kind(layer)
    device = layer.weight.device
    if kind == "linear":
        layer.weight.data.copy_(weight.to(layer.weight.dtype))
        return
    if kind == "4bit":
        old = layer.weight
        new = bnb.nn.Params4bit(weight.to(torch.float32).cpu(), requires_grad=False, quant_type=old.quant_type,
                                blocksize=old.blocksize, compress_statistics=old.compress_statistics)
        layer.weight = new.to(device)
        return
    layer.weight = bnb.nn.Int8Params(weight.to(torch.float16 if device.type == "cuda" else torch.float32).cpu(),
                                     requires_grad=False, has_fp16_weights=False).to(device)
    layer.state.CB = None
    layer.state.SCB = None


def quantization_available(kind: str, device: torch.device) -> str | None:
    """None if bitsandbytes can run ``kind`` ("4bit"/"8bit") on ``device``, else the reason as one line."""
    if bnb is None:
        return "bitsandbytes is not installed: pip install 'bitsandbytes>=0.45'"
    try:
        probe = bnb.nn.Linear4bit(8, 8, bias=False) if kind == "4bit" else bnb.nn.Linear8bitLt(8, 8, bias=False, has_fp16_weights=False)
        probe = probe.to(device)
        probe(torch.zeros(1, 8, device=device, dtype=torch.float32 if device.type == "cpu" else torch.float16))
    except Exception as error:  # noqa: BLE001 - any failure means "no backend here"
        return f"bitsandbytes has no working {kind} backend on {device}: {type(error).__name__}: {error}"
    return None
