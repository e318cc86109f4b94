"""recipes/engine.py without launching DeepSpeed: which modules ZeRO-3 gathers whole."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from recipes import engine
from conftest import TINY_MODEL
from recipes.modeling import preset_config


@pytest.fixture
def tiny_llama():
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**preset_config("tiny_llama")))


def leaves(model):
    return sorted({type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)})


def test_zero3_on_gpus_gathers_each_decoder_layer_whole(tiny_llama, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    units = engine.whole_layer_fetch(tiny_llama, {"zero_optimization": {"stage": 3}})
    assert units == ["LlamaDecoderLayer"]
    assert leaves(tiny_llama) == ["LlamaDecoderLayer"]
    assert sum(getattr(m, "_z3_leaf", False) for m in tiny_llama.modules()) == len(tiny_llama.model.layers)


@pytest.mark.parametrize("case", ["cpu", "zero2", "threshold set"])
def test_per_module_fetch_is_left_alone(tiny_llama, monkeypatch, case):
    """On CPU (DeepSpeed 0.19.8's whole-module fetch needs CUDA), under ZeRO-2, and when the config chooses
    DeepSpeed's own granularity rule, nothing is marked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: case != "cpu")
    zero = {"stage": 2 if case == "zero2" else 3}
    if case == "threshold set":
        zero["stage3_module_granularity_threshold"] = 1000
    assert engine.whole_layer_fetch(tiny_llama, {"zero_optimization": zero}) == []
    assert leaves(tiny_llama) == []


def test_deepspeeds_parser_judges_a_config_for_several_processes_before_their_group_exists():
    """validate runs before torch.distributed starts, where DeepSpeed's parser sees one process: a valid config for
    four ranks passes, and a key DeepSpeed refuses is named whatever the world size."""
    from launch.config import resolve
    from recipes.engine import EngineConfigError, check_deepspeed_config
    for world_size in (1, 4):
        check_deepspeed_config(resolve("llama_selora", ["deepspeed.config=zero3", *TINY_MODEL]), 10, world_size)
        bad = resolve("llama_selora", ["deepspeed.config=zero2", *TINY_MODEL,
                                       "deepspeed.overrides={zero_optimization: {offload_param: {device: gpu}}}"])
        with pytest.raises(EngineConfigError, match=r"zero_optimization\.offload_param\.device = 'gpu'"):
            check_deepspeed_config(bad, 10, world_size)
