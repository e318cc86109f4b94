"""Attention for padding-free batches (``data.padding_free``): every example of the flat row attends only to
itself, with work in proportion to its own length.

transformers alone handles such rows with SDPA and a (1, 1, T, T) block-diagonal mask built from the restarting
positions: correct, but the masked kernel computes the whole T x T product (eight examples in a row: eight times
the attention work) and never takes the flash path. Here, on a GPU in bf16/fp16, torch's variable-length flash
attention kernels (the ones ``torch.nn.attention.varlen`` wraps, called directly) take the examples' boundaries
(``cu_seq_lens_q``, which the padding-free collate sends with each batch, as transformers' own flash-attention
kwargs) and compute each example's causal attention alone. Elsewhere (a CPU, fp32) the same boundaries drive one
causal SDPA call per example. Calls without boundaries (evaluation of padded batches, generation) go to
transformers' SDPA unchanged.

`use_attention(model, name)` switches a loaded model; `resolve_attention` turns ``model.attention: auto`` into a
name: varlen for padding-free batches on a GPU, sdpa otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

VARLEN = "selora_varlen"  # the name registered with transformers' attention and mask interfaces
CHOICES = ("auto", "sdpa", "eager", "varlen")


class AttentionConfigError(ValueError):
    """A model.attention value the recipe cannot use."""


def resolve_attention(choice: str, padding_free: bool, device: torch.device) -> str:
    """model.attention -> the implementation name to give transformers."""
    choice = str(choice)
    if choice not in CHOICES:
        raise AttentionConfigError(f"model.attention={choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "auto":
        return VARLEN if padding_free and device.type == "cuda" else "sdpa"
    return VARLEN if choice == "varlen" else choice


def attention_for_model(model: torch.nn.Module, choice: str, padding_free: bool, device: torch.device,
                        max_length: int) -> str:
    """`resolve_attention`, then `fit_to_model`."""
    return fit_to_model(model, choice, resolve_attention(choice, padding_free, device), max_length)


def fit_to_model(model: torch.nn.Module, choice: str, name: str, max_length: int) -> str:
    """``name`` (`resolve_attention`'s for model.attention=``choice``), narrowed to what the loaded model's family
    can run: the varlen kernels know neither soft-capped attention logits (Gemma 2) nor sliding windows shorter than
    an example (Gemma 2/3, Mistral), and transformers has no SDPA path for some families (Gemma 2). ``auto`` falls
    back to the next implementation that is exact (varlen -> sdpa -> eager); a choice the model cannot run raises
    AttentionConfigError."""
    choice = str(choice)
    config = model.config
    if name == VARLEN:
        reason = varlen_unsupported(config, max_length)
        if reason and choice == "varlen":
            raise AttentionConfigError(f"model.attention=varlen: this {config.model_type} model has {reason}, which "
                                       "the varlen kernels do not apply; set model.attention=auto")
        name = "sdpa" if reason else name
    if name == "sdpa" and not getattr(model, "_supports_sdpa", True):
        if choice == "sdpa":
            raise AttentionConfigError(f"model.attention=sdpa: transformers has no SDPA attention for "
                                       f"{type(model).__name__}; set model.attention=auto (eager) or eager")
        name = "eager"
    return name


def varlen_unsupported(config, max_length: int) -> str | None:
    """What in ``config`` (a transformers model config) varlen attention would silently drop, or None."""
    if getattr(config, "attn_logit_softcapping", None):
        return f"attention logit soft-capping (attn_logit_softcapping={config.attn_logit_softcapping})"
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    windowed = "sliding_attention" in layer_types if layer_types else getattr(config, "use_sliding_window", True)
    if window and windowed and window < max_length:
        return f"a sliding window of {window} tokens, shorter than data.max_length={max_length}"
    return None


def use_attention(model: torch.nn.Module, name: str) -> None:
    """Make ``model`` (a transformers model) attend with ``name`` from its next forward on."""
    if name == VARLEN:
        register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def register() -> None:
    """Register the varlen attention with transformers (idempotent). Its masks are SDPA's, for the calls that
    bring no boundaries and need one (left-padded generation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, **kwargs):
    """transformers' attention-function signature: query (1, heads, T, dim), key/value (1, kv_heads, T, dim);
    returns ((1, T, heads, dim), None)."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes one flat row per batch, got {query.shape[0]} rows")
    if dropout and module.training:
        raise ValueError("varlen attention has no attention dropout; set the model's attention_dropout to 0")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, dim)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    kernel = flash_varlen if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) else per_example_sdpa
    out = kernel(q, k, v, cu_seq_lens_q, int(max_length_q), scale)
    return out.unsqueeze(0), None


def repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    groups = q.shape[1] // k.shape[1]
    return (k, v) if groups == 1 else (k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1))


def per_example_sdpa(q, k, v, cu_seq_lens, max_length: int, scale: float) -> torch.Tensor:
    """One causal SDPA call per example: the reference, and the path on a CPU. (T, heads, dim) in and out."""
    k, v = repeat_kv(q, k, v)
    bounds = cu_seq_lens.tolist()
    parts = [F.scaled_dot_product_attention(*(t[start:end].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                            scale=scale).transpose(0, 1)
             for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts)


def flash_varlen(q, k, v, cu_seq_lens, max_length: int, scale: float) -> torch.Tensor:
    """Variable-length flash attention, causal inside each example: the flash kernels torch ships (the ones its
    ``torch.nn.attention.varlen`` wraps), called directly from one autograd function. The public wrapper is a
    ``torch.library`` custom op whose dispatch costs host time on every call, and at the 1.3B bench shape the
    training step is host-bound (docs/benchmarks/README.md)."""
    k, v = repeat_kv(q, k, v)
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    return _FlashVarlen.apply(q, k, v, cu, int(max_length), float(scale))


class _FlashVarlen(torch.autograd.Function):
    """aten's flash attention forward/backward on (T, heads, dim) rows cut at ``cu`` (no dropout)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_length: int, scale: float):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_length, max_length, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
        ctx.max_length, ctx.scale = max_length, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_length, ctx.max_length, 0.0, True, seed,
            offset, scale=ctx.scale)
        return dq, dk, dv, None, None, None
