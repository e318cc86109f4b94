"""Shared fixtures: a tiny seeded LLaMA (64 wide, 2 layers, grouped-query attention) and a fixed batch of ids."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Every test that runs a recipe names the small random model explicitly (the recipes' own default is a real one).
TINY_MODEL = ["model.preset=tiny_llama"]
# A few seconds of training: 16 records, one micro-batch of 4 per step, no evaluation or TensorBoard.
SMALL_RUN = TINY_MODEL + ["data.max_train_records=16", "data.max_eval_records=4", "train.micro_batch_size=4",
                          "train.gradient_accumulation_steps=1", "train.warmup_steps=1", "train.eval_every=0",
                          "train.tensorboard=false"]

TINY_LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128)


def free_port() -> int:
    """A TCP port no one listens on now, for one launch's rendezvous. Every launch asks afresh: a fixed or pid-derived
    port collides with another test file's launch, or with a process a killed run left behind (EADDRINUSE)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(processes: int) -> list[str]:
    """The command that starts ``processes`` ranks of a script on this machine (torchrun, rendezvous on a free port);
    the script and its arguments follow."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port())]


def build_tiny_llama(**overrides) -> LlamaForCausalLM:
    """A fresh tiny LLaMA in eval mode; the same weights on every call (seed 0), whatever ran before."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def quantize_projections(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Replace every nn.Linear but lm_head by its bitsandbytes nf4 ("4bit") or int8 ("8bit") version, on the CPU."""
    from recipes.modeling import quantize_linears

    return quantize_linears(model, kind, torch.float32, "nf4")


@pytest.fixture(scope="session", autouse=True)
def selora_cache(tmp_path_factory):
    """The test session's own cache of converted .gguf files (recipes/gguf_cache.py), for every process it starts:
    each run starts cold, and the user's ~/.cache is never touched."""
    previous = os.environ.get("SELORA_CACHE")
    os.environ["SELORA_CACHE"] = str(tmp_path_factory.mktemp("selora_cache"))
    yield Path(os.environ["SELORA_CACHE"])
    if previous is None:
        del os.environ["SELORA_CACHE"]
    else:
        os.environ["SELORA_CACHE"] = previous


@pytest.fixture
def tiny_llama():
    """Factory: ``tiny_llama()`` builds a fresh seeded model; keyword arguments override the LlamaConfig."""
    return build_tiny_llama


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))


def model_snapshot(model: torch.nn.Module) -> dict:
    """What an error must leave untouched: state_dict keys and values, module types, trainable flags."""
    return {
        "keys": list(model.state_dict()),
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(name, type(module)) for name, module in model.named_modules()],
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "selora_config": hasattr(model, "selora_config"),
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = model_snapshot(model)
    assert after["keys"] == before["keys"]
    assert after["types"] == before["types"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["selora_config"] == before["selora_config"]
    for key, value in before["values"].items():
        assert torch.equal(after["values"][key], value), key


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The output_dir of a finished 4-step llama_selora run (SMALL_RUN) with checkpoints at steps 2 and 4.
    Shared by the session: copy it before changing anything in it."""
    from launch.config import resolve
    from recipes import finetune

    out = tmp_path_factory.mktemp("finished") / "run"
    finetune.run(resolve("llama_selora", SMALL_RUN + ["train.max_steps=4", "train.save_every=2",
                                                      f"train.output_dir={out}"]))
    return out


def kill_at_step(monkeypatch, step: int):
    """From now on a run raises KeyboardInterrupt when it logs ``step`` (as if killed after that optimizer step,
    before its log line); returns the function that lets runs log again."""
    from recipes import metrics
    log = metrics.MetricsLogger.log

    def killed(self, at, **values):
        if at == step:
            raise KeyboardInterrupt("simulated kill")
        return log(self, at, **values)
    monkeypatch.setattr(metrics.MetricsLogger, "log", killed)
    return lambda: monkeypatch.setattr(metrics.MetricsLogger, "log", log)
