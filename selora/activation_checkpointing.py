"""Activation (gradient) checkpointing whose recomputation reuses the SeLoRA rows of the original forward.

A checkpointed decoder block is recomputed in backward, after the top-level forward returned and the model's
decoder took its rows back; with plain checkpointing every SeLoRA factor then decodes itself again, a handful of
small kernels per factor (448 factors at LLaMA-7B) per step. `enable_gradient_checkpointing` turns on the
model's own (Hugging Face) non-reentrant checkpointing with a ``context_fn`` that gives each recomputation the
rows its original forward used (`ModelDecoder.checkpoint_contexts`).

In your own ``torch.utils.checkpoint.checkpoint`` calls, pass ``use_reentrant=False,
context_fn=selora.checkpoint_context_fn(model)`` for the same effect.
"""
from __future__ import annotations

import contextlib

from torch import nn


class DecoderCheckpointContexts:
    """``context_fn`` for torch.utils.checkpoint: ``model``'s decoder's contexts, looked up at each checkpoint
    call, so it can be set before `selora.apply` (the recipes enable checkpointing while loading the base model)
    or on a model without SeLoRA factors (then both contexts do nothing)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self) -> tuple:
        decoder = getattr(self.model, "selora_decoder", None)
        if decoder is None:
            return contextlib.nullcontext(), contextlib.nullcontext()
        return decoder.checkpoint_contexts()


def checkpoint_context_fn(model: nn.Module) -> DecoderCheckpointContexts:
    """The ``context_fn`` to pass to torch.utils.checkpoint.checkpoint(..., use_reentrant=False) for blocks of
    ``model`` (the module `selora.apply` was called on)."""
    return DecoderCheckpointContexts(model)


def enable_gradient_checkpointing(model: nn.Module, **checkpoint_kwargs) -> nn.Module:
    """Turn on ``model``'s Hugging Face gradient checkpointing, non-reentrant, with selora's ``context_fn``;
    before or after `selora.apply`. Returns ``model``.

    ``checkpoint_kwargs`` go to torch.utils.checkpoint.checkpoint (e.g. determinism_check). Calling HF's
    gradient_checkpointing_enable yourself also trains correctly, only slower: each factor decodes itself in
    each recomputation."""
    if checkpoint_kwargs.get("use_reentrant") or "context_fn" in checkpoint_kwargs:
        raise ValueError(f"enable_gradient_checkpointing sets use_reentrant=False and context_fn itself; got "
                         f"{sorted(checkpoint_kwargs)}: drop them (reentrant checkpointing takes no context_fn)")
    kwargs = {**checkpoint_kwargs, "use_reentrant": False, "context_fn": checkpoint_context_fn(model)}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name; where it exists the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable (not a transformers model); "
                        "in your own torch.utils.checkpoint.checkpoint calls pass use_reentrant=False, "
                        "context_fn=selora.checkpoint_context_fn(model)")
    return model
