"""bitsandbytes in one place: what kind of base a layer has, its weight as a dense float matrix, how to write a
new dense weight back (re-quantizing 4-bit / 8-bit bases with their own settings), keeping 4-bit weights in the
one layout selora reads (`keep_4bit_layout`), and how many weights a packed parameter holds (`parameter_count`).

Every caller that must *see* or *change* a base weight (merge, PiSSA init, SRLoRA fusion, DoRA norms) goes
through `dense_weight` and `write_dense_weight`; nothing else in selora touches bitsandbytes internals.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

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


def _cpu_packed(weight: torch.Tensor) -> bool:
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def keep_4bit_layout(model: nn.Module) -> int:
    """Keep every bnb Linear4bit in ``model`` in bitsandbytes' standard packed layout; returns how many layers
    were switched back from the CPU layout.

    bitsandbytes >= 0.49, on a CPU with AVX512-BF16, rewrites a Linear4bit's weight into a CPU-only layout on
    its first eval-mode no-grad forward. That layout computes in bf16 (train- and eval-mode outputs then
    differ), breaks `dequantize_4bit`, and crashes for out_features % 32 != 0. A model selora adapts is trained
    and evaluated in turns, so its 4-bit layers stay in the standard layout (GPU behaviour is unchanged: the
    rewrite is CPU-only). A layer already rewritten is converted back with bitsandbytes' own inverse.
    """
    restored = 0
    for module in model.modules():
        if bnb is None or not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False  # the flag Linear4bit.forward checks before rewriting
        if _cpu_packed(module.weight):
            module.weight.data, module.weight.quant_state = _from_cpu_layout(module.weight.data, module.weight.quant_state)
            module.quant_state = module.weight.quant_state
            restored += 1
    return restored


def _from_cpu_layout(data: torch.Tensor, state):
    """bitsandbytes' inverse of its CPU layout, completed: it leaves a non-nested absmax transposed as
    (in / blocksize, out) bf16. Exact up to that bf16 rounding of the block scales (~0.4%). Changes ``state``."""
    nested = state.original_nested
    data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, state)
    if not nested:
        state.absmax = state.absmax.T.reshape(-1).float()
    return data, state


def _standard_4bit(weight: torch.Tensor):
    """(packed data, quant_state) in bitsandbytes' standard layout, without changing ``weight``."""
    if not _cpu_packed(weight):
        return weight.data, weight.quant_state
    return _from_cpu_layout(weight.data, copy.deepcopy(weight.quant_state))


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as a dense (out, in) float32 tensor (a copy for quantized bases)."""
    kind = base_kind(layer)
    if kind == "4bit":
        data, state = _standard_4bit(layer.weight)
        if torch.compiler.is_compiling():  # as `base_output`: fused by the compiler, no library call in the graph
            return dequantize_4bit_traced(data, state, torch.float32)
        return bnb_functional.dequantize_4bit(data, state).float()
    if kind == "8bit":
        codes, row_scale = _int8_parts(layer)
        return codes.float() * (row_scale.float().unsqueeze(1) / 127.0)
    return layer.weight.data.float()


def base_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``. Inside a compiled region (torch.compile) a 4-bit base instead dequantizes its weight with
    torch ops (`dequantize_4bit_traced`), which the compiler fuses into one kernel that it can also re-run in the
    backward: bitsandbytes' own path is a Python call into a library per use and four or five kernels (the nested
    block scales, the 4-bit codes, in the backward a float32 copy then a cast), at each of a step's three uses of
    the weight (forward, checkpoint recomputation, input gradient). Same values and the same F.linear (on a GPU a
    few weights in ten million, quantized from float32 with nested scales, land one bf16 step apart: the compiler
    fuses the scales' multiply and add; bench/nf4_compiled_check.py). Eager calls (and 8-bit bases, the CPU's
    packed layout) keep bitsandbytes'."""
    if not (torch.compiler.is_compiling() and base_kind(layer) == "4bit" and not _cpu_packed(layer.weight)):
        return layer(x)
    dtype = layer.compute_dtype or x.dtype
    # Checkpointed: the backward dequantizes again instead of keeping the dense weight, which the compiler would
    # otherwise keep (a dense copy of every base weight in memory, for a run without gradient checkpointing).
    weight = checkpoint(dequantize_4bit_traced, layer.weight.data, layer.weight.quant_state, dtype,
                        use_reentrant=False)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return F.linear(x.to(dtype), weight, bias).to(x.dtype)


def dequantize_4bit_traced(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' blockwise 4-bit dequantization (nf4 or fp4, nested block scales or not) in torch ops:
    each byte holds two codes (high nibble first), a code's value is ``state.code[code]`` times its block's scale,
    computed in float32 and rounded once to ``dtype``, as bitsandbytes' kernels do. ``packed``: the standard
    layout, any storage dtype. Returns (out, in). Element-wise, indexing and view ops only: one fused kernel."""
    count = math.prod(state.shape)
    scales = state.absmax
    if state.nested:  # the block scales are themselves 8-bit codes with float32 scales per 256 of them
        inner = state.state2
        scales = inner.code[scales.long()] * _per_block(inner.absmax, inner.blocksize, scales.numel()) + state.offset
    codes = packed.reshape(-1).view(torch.uint8).unsqueeze(-1)  # (bytes, 1)
    high = torch.arange(2, device=codes.device) == 0  # (2,): the first code of a byte is its high nibble
    codes = torch.where(high, codes >> 4, codes & 0x0F).reshape(-1)[:count]
    values = state.code[codes.long()] * _per_block(scales.float(), state.blocksize, count)
    return values.to(dtype).reshape(state.shape)


def _per_block(scales: torch.Tensor, blocksize: int, count: int) -> torch.Tensor:
    """Each block's scale repeated over its ``blocksize`` elements, cut to ``count`` (the last block may be short)."""
    return scales.unsqueeze(-1).expand(-1, blocksize).reshape(-1)[:count]


def write_dense_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Replace the base weight by ``weight`` (out, in); quantized bases are re-quantized with their settings
    (4-bit: quant type, block size, nested statistics and storage dtype)."""
    kind = base_kind(layer)
    device = layer.weight.device
    if kind == "linear":
        layer.weight.data.copy_(weight.to(layer.weight.dtype))
        return
    if kind == "4bit":
        old = layer.weight
        new = bnb.nn.Params4bit(weight.to(torch.float32).cpu(), requires_grad=False, quant_type=old.quant_type,
                                blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                quant_storage=old.quant_storage, module=layer)
        layer.weight = new.to(device)  # quantizes on the move and points layer.quant_state at the new state
        return
    layer.weight = bnb.nn.Int8Params(weight.to(torch.float16 if device.type == "cuda" else torch.float32).cpu(),
                                     requires_grad=False, has_fp16_weights=False).to(device)
    layer.state.CB = None
    layer.state.SCB = None


def parameter_count(param: torch.Tensor) -> int:
    """How many weights ``param`` stands for: its elements (the whole parameter under ZeRO-3), except that 4-bit
    packed storage holds two weights per byte whatever dtype stores the bytes (uint8, or bf16 as transformers
    loads 4-bit checkpoints)."""
    stored = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
    if bnb is not None and isinstance(param, bnb.nn.Params4bit):
        return stored * param.element_size() * 2
    return stored


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
