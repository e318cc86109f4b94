"""The registry of adapter methods: a new method is one config class with ``@register_method``; applying it,
saving and loading its adapter, and the recipe's config schema then work without listing it anywhere else."""
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import selora
from selora.factors import DenseFactor

from conftest import build_tiny_llama


@pytest.fixture
def half_rank_method():
    """A toy method registered for one test: LoRA whose factors start at half LoRA's scale (its own field,
    ``start_scale``), removed from the registry afterwards so other tests see the shipped methods only."""

    @selora.register_method
    @dataclass
    class HalfStartConfig(selora.LoRAConfig):
        method: ClassVar[str] = "half_start"
        start_scale: float = 0.5

        def make_factor(self, length, zero, generator, device, index_sets=None):
            factor = DenseFactor(self.r, length, zero, generator, device)
            factor.weight.data.mul_(self.start_scale)
            return factor

    yield HalfStartConfig
    del selora.ADAPTER_METHODS["half_start"]


def test_the_shipped_methods_are_registered_in_order():
    assert list(selora.ADAPTER_METHODS) == ["lora", "selora"]
    assert selora.method_config("selora") is selora.SeLoRAConfig
    with pytest.raises(selora.ConfigValueError, match=r"method='dora': unknown adapter method; choose one of lora, selora"):
        selora.method_config("dora")


def test_a_registered_method_applies_saves_and_loads(half_rank_method, tmp_path):
    config = half_rank_method(r=2, target_modules=("q_proj",), start_scale=0.25)
    lora = selora.apply(build_tiny_llama(), selora.LoRAConfig(r=2, target_modules=("q_proj",)))
    model = selora.apply(build_tiny_llama(), config)
    layer, reference = (next(iter(selora.adapter_layers(m).values())) for m in (model, lora))
    # Same seed and draw as LoRA, scaled by the method's own factor: its make_factor made the factors.
    torch.testing.assert_close(layer.lora_A.weight, 0.25 * reference.lora_A.weight)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    ids = torch.arange(12).reshape(2, 6)
    expected = model(ids).logits
    selora.save_adapter(model, tmp_path / "adapter")
    loaded = build_tiny_llama()
    selora.load_adapter(loaded, tmp_path / "adapter")  # the saved config names the method; from_dict finds it
    assert type(loaded.selora_config) is half_rank_method and loaded.selora_config.start_scale == 0.25
    torch.testing.assert_close(loaded(ids).logits, expected)


def test_the_recipe_schema_takes_every_registered_methods_fields():
    from launch.config import AdapterSection

    fields = {f.name for f in dataclasses.fields(AdapterSection)}
    for cls in selora.ADAPTER_METHODS.values():
        assert {f.name for f in dataclasses.fields(cls)} <= fields
    assert AdapterSection().method == "selora"
