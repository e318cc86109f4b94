"""model.compile: which runs compile, which regions, and that a compiled run trains exactly as the eager one.

The recipe runs compile with TorchDynamo's "aot_eager" backend here (the same capture and autograd as inductor,
without its C++ code generation, which costs a minute per shape on these CPUs): losses must then equal the eager
run's to float32 rounding, through gradient checkpointing, SeLoRA's batched decode and SRLoRA's recompositions."""
from __future__ import annotations

import json

import pytest
import torch

from launch.config import resolve
from recipes import compiled_regions, finetune
from recipes.compiled_regions import compile_choice, decoder_regions
from recipes.validate import RecipeConfigError, validate

from conftest import SMALL_RUN

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_auto_compiles_on_a_gpu_except_8bit_bases():
    assert compile_choice("auto", CUDA, "none")[0] and compile_choice("auto", CUDA, "4bit")[0]
    on, line = compile_choice("auto", CPU, "8bit")
    assert not on and line == "model.compile=auto: eager (not on a GPU, an 8bit base; model.compile=true compiles anyway)"
    assert compile_choice(True, CPU, "8bit")[0] and compile_choice("true", CPU, "none")[0]
    assert not compile_choice(False, CUDA, "none")[0]
    assert validate(resolve("llama_lora", SMALL_RUN + ["model.compile=true"]), device=CPU).compiled


def test_a_wrong_value_fails_before_anything_loads():
    with pytest.raises(RecipeConfigError, match=r"model.compile='fast': choose one of auto, true, false"):
        validate(resolve("llama_lora", SMALL_RUN + ["model.compile=fast"]))


def test_regions_are_each_decoder_layers_attention_mlp_and_norms(tiny_llama):
    model = tiny_llama()
    names = [type(region).__name__ for region in decoder_regions(model)]
    assert names == ["LlamaAttention", "LlamaMLP", "LlamaRMSNorm", "LlamaRMSNorm"] * 2


def losses(path) -> list[float]:
    return [line["loss"] for line in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
            if "loss" in line]


def test_a_compiled_run_trains_as_the_eager_one(tmp_path, monkeypatch):
    """SeLoRA with SRLoRA recomposing at step 2, padding-free batches, checkpointing: every path a region meets."""
    srlora = ["srlora.schedule=fixed", "srlora.start_step=2", "srlora.interval=2", "srlora.end_step=2",
              "srlora.svd=randomized", "data.padding_free=true"]
    monkeypatch.setattr(compiled_regions, "BACKEND", "aot_eager")
    compiled_graphs = []
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda module, **kw: compiled_graphs.append(module) or original(module, **kw))
    runs = {}
    for setting in ("false", "true"):
        out = tmp_path / setting
        finetune.run(resolve("llama_selora_srlora", SMALL_RUN + srlora + [
            "train.max_steps=4", "train.save_every=0", "model.gradient_checkpointing=true", f"model.compile={setting}",
            f"train.output_dir={out}"]))
        runs[setting] = losses(out)
    assert len(compiled_graphs) == 8  # only the compiled run, every region of the 2 layers
    assert len(runs["true"]) == len(runs["false"]) == 4
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-5, abs=1e-6)
