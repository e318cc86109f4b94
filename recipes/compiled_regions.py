"""model.compile: regional torch.compile of each decoder layer's attention, MLP and norms.

At the 1-3B shapes the step is host-bound: each adapted projection is a handful of small kernel launches, each
from Python. Compiling the repeated regions of a decoder layer (as torchtune and transformers do) turns a region
into one graph call whose elementwise work is fused; the regions of every layer share one compiled graph, so
compiling costs seconds, not minutes. The regions sit *inside* transformers' gradient-checkpointing wrapper: the
checkpoint (with selora's ``context_fn``, which TorchDynamo cannot trace) stays eager and recomputes through the
compiled regions. Generation runs eager (`eager_for_generation`): its shapes change every token.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

CHOICES = ("auto", "true", "false")
BACKEND = "inductor"  # torch.compile's default; tests swap in "aot_eager" (same capture, no code generation)
REGIONS = ("self_attn", "mlp")  # plus every child norm of a decoder layer (class names ending in "Norm")


class CompileConfigError(ValueError):
    """model.compile holds a value the recipe does not know."""


def compile_choice(setting, device: torch.device, quantization: str) -> tuple[bool, str]:
    """Whether to compile, and the one log line that says so and why. ``auto`` compiles on a GPU, where it was
    measured to win and to train exactly (docs/benchmarks/recipe_vs_peft_2026-12-05.md: the plain engine, ZeRO-2
    and ZeRO-3, bf16 and nf4 bases); 8-bit bases (not measured) and the CPU (compiling costs more than it saves
    on a short run) stay eager. ``setting``: one of CHOICES (a YAML true/false arrives as a bool)."""
    choice = str(setting).lower()
    if choice not in CHOICES:
        raise CompileConfigError(f"model.compile={setting!r}: choose one of {', '.join(CHOICES)}")
    if choice == "false":
        return False, "model.compile=false: eager"
    if choice == "true":
        return True, "model.compile=true: decoder regions compiled (torch.compile)"
    reasons = [reason for reason, applies in (
        ("not on a GPU", device.type != "cuda"),
        ("an 8bit base", quantization == "8bit")) if applies]
    if reasons:
        return False, f"model.compile=auto: eager ({', '.join(reasons)}; model.compile=true compiles anyway)"
    return True, "model.compile=auto: decoder regions compiled (torch.compile; model.compile=false turns it off)"


def decoder_regions(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's attention, MLP and norms: the modules a layer repeats, in model order."""
    regions = []
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            for name, child in module.named_children():
                if name in REGIONS or type(child).__name__.endswith("Norm"):
                    regions.append(child)
    return regions


def compile_regions(model: nn.Module) -> int:
    """Compile every decoder region of ``model`` in place (nn.Module.compile: the module stays the same object,
    its parameters and hooks untouched); returns how many. Call after the adapters are in."""
    regions = decoder_regions(model)
    if not regions:
        raise CompileConfigError(f"model.compile: {type(model).__name__} has no *DecoderLayer modules to compile; "
                                 "set model.compile=false")
    for region in regions:
        region.compile(backend=BACKEND)
    return len(regions)


def eager_for_generation():
    """A context in which compiled regions run eager (generation's shapes change every new token)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
