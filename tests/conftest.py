"""Shared fixtures: a tiny seeded LLaMA (64 wide, 2 layers, grouped-query attention) and a fixed batch of ids."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128)


def build_tiny_llama(**overrides) -> LlamaForCausalLM:
    """A fresh tiny LLaMA in eval mode; the same weights on every call (seed 0), whatever ran before."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def tiny_llama():
    """Factory: ``tiny_llama()`` builds a fresh seeded model; keyword arguments override the LlamaConfig."""
    return build_tiny_llama


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
