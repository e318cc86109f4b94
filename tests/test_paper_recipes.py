"""The paper-setting recipes (configs/recipes/paper_*.yaml) reproduce the SeLoRA paper's parameter budgets, counted
on the meta device for the LLaMA-2-7B and LLaMA-3-8B shapes: LoRA r=32 on q,k,v,up,down = 0.83% / 0.70%,
SeLoRA_W at spectral_ratio 0.6 = 0.50% of LLaMA-2-7B, at 0.4 = 0.28% of LLaMA-3-8B, SeDoRA_W = 0.51%."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import selora
from launch.config import resolve
from recipes.validate import adapter_config_from
from recipes.modeling import preset_config


def percent(recipe: str, preset: str, overrides=()) -> float:
    config = adapter_config_from(resolve(recipe, list(overrides)).adapter)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**preset_config(preset)))
    selora.apply(model, config)
    return selora.count_parameters(model)["trainable_percent"]  # of all parameters, adapters included (as PEFT)


@pytest.mark.parametrize("recipe, preset, overrides, paper", [
    ("paper_lora", "llama2_7b", (), 0.83),
    ("paper_lora", "llama3_8b", (), 0.70),
    ("paper_selora_w", "llama2_7b", (), 0.50),
    ("paper_selora_w", "llama3_8b", ("adapter.spectral_ratio=0.4",), 0.28),
    ("paper_sedora_w", "llama2_7b", (), 0.51),
])
def test_paper_parameter_budgets(recipe, preset, overrides, paper):
    assert round(percent(recipe, preset, overrides), 2) == paper


def test_paper_recipes_are_the_papers_setting():
    for recipe in ("paper_lora", "paper_selora_w", "paper_sedora_w"):
        adapter = resolve(recipe, []).adapter
        assert (adapter.r, adapter.alpha, adapter.dropout) == (32, 64.0, 0.05)
        assert list(adapter.target_modules) == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert resolve("paper_selora_w", []).adapter.basis == "haar"
    assert resolve("paper_sedora_w", []).adapter.use_dora
