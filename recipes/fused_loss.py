"""model.fused_loss: the output layer and the cross-entropy as one chunked kernel (liger-kernel's fused linear
cross-entropy), so a training forward never holds the (tokens, vocabulary) logits.

transformers computes every position's logits in the compute dtype, then a float32 copy for the loss, and keeps
them for the backward: at a LLaMA-3 shape (128k vocabulary, 4 x 2048 tokens) that is about 6 GiB per micro-batch,
the largest tensor of the step. liger-kernel (BSD-2-Clause; the switch LLaMA-Factory and axolotl expose) computes
the loss and the gradient of the hidden states chunk by chunk in its forward. Only the training forward (labels
given) is routed through it; generation and label-free calls keep transformers' own forward. The summed token loss
over ``num_items_in_batch`` is the recipe's loss, as with transformers.

Under ZeRO-3 the output weight is partitioned and the fused route reads it outside the output layer's forward:
DeepSpeed's engine finds a partitioned parameter read during its forward outside its own module, gathers it and from
then on fetches and releases it with the module that read it (the whole model here; "external parameters" in
DeepSpeed's ZeRO-3 documentation), so nothing is done here (tests/test_engine.py checks the loss sees the weight
whole, leaves it released, and gives the logits path's losses).
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

CHOICES = ("auto", "true", "false")


class FusedLossConfigError(ValueError):
    """model.fused_loss holds a value the recipe does not know, or asks for what cannot run here."""


def liger_available() -> str | None:
    """None when liger-kernel's fused linear cross-entropy can be imported, else why not (one line)."""
    for module, fix in (("triton", "a CUDA build of torch brings it"), ("liger_kernel", "pip install 'selora[gpu]'")):
        if importlib.util.find_spec(module) is None:
            return f"no {module}: {fix}"
    return None


def fused_loss_choice(setting, device: torch.device, zero_stage: int) -> tuple[bool, str]:
    """Whether to route the training loss through liger-kernel, and the one log line that says so and why. ``auto``
    fuses where it can run: on a GPU with liger-kernel installed, under any engine (ZeRO-3 included).
    ``true`` where it cannot run is an error, raised before any model is loaded. ``setting``: one of CHOICES (a YAML
    true/false arrives as a bool); ``zero_stage``: DeepSpeed's ZeRO stage, 0 for the plain engine (named in the
    log line)."""
    choice = str(setting).lower()
    if choice not in CHOICES:
        raise FusedLossConfigError(f"model.fused_loss={setting!r}: choose one of {', '.join(CHOICES)}")
    if choice == "false":
        return False, "model.fused_loss=false: logits, then transformers' cross-entropy"
    missing = liger_available() if device.type == "cuda" else None
    reasons = [reason for reason, applies in (
        ("not on a GPU", device.type != "cuda"),
        (missing, missing is not None)) if applies]
    if reasons and choice == "true":
        raise FusedLossConfigError(f"model.fused_loss=true cannot run here ({'; '.join(reasons)}); set "
                                   "model.fused_loss=auto or false")
    if reasons:
        return False, f"model.fused_loss=auto: logits, then transformers' cross-entropy ({'; '.join(reasons)})"
    gathered = "; under ZeRO-3 DeepSpeed gathers the output weight for it" if zero_stage == 3 else ""
    return True, (f"model.fused_loss={choice}: output layer and cross-entropy fused (liger-kernel; no logits are "
                  f"kept{gathered})")


def liger_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """The causal-LM loss of ``hidden`` (batch, seq, h) through the output ``weight`` (vocab, h): labels shifted by
    one position, -100 ignored; summed over ``num_items_in_batch`` when given, else the mean over learned tokens."""
    from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss
    return LigerForCausalLMLoss(hidden_states=hidden, lm_head_weight=weight, labels=labels,
                                hidden_size=hidden.shape[-1], num_items_in_batch=num_items_in_batch)


LOSS = liger_loss  # tests swap in a plain-torch reference with the same contract (liger needs a GPU)


def unfusable(model: nn.Module) -> str | None:
    """Why ``model``'s output layer and loss cannot be fused (one line), or None: the route needs a *ForCausalLM
    with a decoder (``.model``) and a bias-free output layer (``.lm_head``), whose logits are not capped."""
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Linear) or head.bias is not None:
        return f"{type(model).__name__} has no decoder (.model) and bias-free output layer (.lm_head)"
    if getattr(model.config, "final_logit_softcapping", None):
        return f"{type(model).__name__} caps its logits"
    return None


def use_fused_loss(model: nn.Module, line: str, required: bool) -> str:
    """Route ``model``'s training forward (called with labels) through the fused loss, in place; other calls run
    transformers' forward unchanged. Returns the log line; a model that cannot be fused (`unfusable`) is an error
    when the fusion was ``required`` (model.fused_loss=true), else it keeps the logits and the line says why."""
    reason = unfusable(model)
    if reason is not None:
        if required:
            raise FusedLossConfigError(f"model.fused_loss=true: {reason}; set model.fused_loss=auto or false")
        return f"model.fused_loss=auto: logits, then transformers' cross-entropy ({reason})"
    decoder, head, original = model.model, model.lm_head, model.forward
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return original(input_ids=input_ids, **kwargs)
        hidden = decoder(input_ids=input_ids, **kwargs).last_hidden_state
        return CausalLMOutputWithPast(loss=LOSS(hidden, head.weight, labels, num_items_in_batch))

    model.forward = forward
    return line
