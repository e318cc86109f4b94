"""selora.inject: what apply() makes trainable, zero change at init (default and PiSSA), seeded locations,
parameter counts against the closed-form formula (LLaMA-7B on the meta device), and bad input that must leave
the model untouched."""
import copy
import math
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import selora
from selora.config import ConfigValueError
from selora.inject import TargetModuleError

from conftest import assert_unchanged, model_snapshot, quantize_projections, relative_error

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ----- trainable parameters and gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    selora.SeLoRAConfig(r=4),
    selora.SeLoRAConfig(r=4, basis="fft2", use_dora=True),
    selora.LoRAConfig(r=4, use_dora=True),
], ids=["selora", "selora-fft2-dora", "lora-dora"])
def test_only_adapter_parameters_train_and_all_receive_gradients(tiny_llama, input_ids, config):
    model = selora.apply(tiny_llama(), config)
    layers = selora.adapter_layers(model)
    assert len(layers) == 2 * 7
    suffixes = ("lora_A.coefficients", "lora_B.coefficients") if isinstance(config, selora.SeLoRAConfig) \
        else ("lora_A.weight", "lora_B.weight")
    suffixes += ("magnitude",) if config.use_dora else ()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{layer}.{suffix}" for layer in layers for suffix in suffixes}
    assert set(trainable) == expected
    for name, buffer in model.named_buffers():
        assert not buffer.requires_grad, name
    with torch.no_grad():  # B != 0 so that A's gradient is non-zero too
        for layer in layers.values():
            layer.lora_B.param.normal_(0, 0.02)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    for name, param in trainable.items():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
    for name, param in model.named_parameters():
        if name not in trainable:
            assert param.grad is None, name


# ----- zero change at init ------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    selora.LoRAConfig(r=4),
    selora.SeLoRAConfig(r=4, basis="haar"),
    selora.SeLoRAConfig(r=4, basis="dct_rows"),
    selora.SeLoRAConfig(r=4, use_dora=True),
    selora.LoRAConfig(r=4, use_dora=True),
    selora.SeLoRAConfig(r=4, use_rslora=True),
    selora.LoRAConfig(r=4, use_rslora=True),
], ids=["lora", "selora-haar", "selora-dct_rows", "selora-dora", "lora-dora", "selora-rslora", "lora-rslora"])
def test_default_init_leaves_logits_bit_identical(tiny_llama, input_ids, config):
    reference = logits(tiny_llama(), input_ids)
    model = selora.apply(tiny_llama(), config)
    assert torch.equal(logits(model, input_ids), reference)


@pytest.mark.parametrize("config", [
    selora.LoRAConfig(r=4, init="pissa"),
    selora.SeLoRAConfig(r=4, basis="haar", init="pissa"),
    selora.SeLoRAConfig(r=4, basis="bior2.2", init="pissa"),
    selora.SeLoRAConfig(r=4, init="pissa", use_dora=True, use_rslora=True),
], ids=["lora", "selora-haar", "selora-bior2.2", "selora-dora-rslora"])
def test_pissa_init_keeps_function_and_weights(tiny_llama, input_ids, config):
    original = tiny_llama()
    reference = logits(original, input_ids)
    model = selora.apply(tiny_llama(), config)
    assert relative_error(logits(model, input_ids), reference) < 1e-5  # measured 3.2e-7
    for name, layer in selora.adapter_layers(model).items():
        weight = original.get_submodule(name).weight
        residual = layer.base_layer.weight
        assert (residual - weight).abs().max() > 1e-2, name  # the base really holds a residual now
        assert (residual + layer.delta_weight() - weight).abs().max() < 1e-5, name


def test_pissa_with_a_randomized_svd_keeps_the_function_and_finds_the_leading_directions(tiny_llama, input_ids):
    """init_svd="randomized" (PEFT's pissa_niter_4): the base still keeps the exact residual, so the function is
    unchanged; on weights whose spectrum falls off, as pretrained ones do, the adapters it starts from are those of
    the full SVD."""
    torch.manual_seed(0)
    original = tiny_llama()
    with torch.no_grad():  # pretrained-like spectra: singular values falling off as 1 / (1 + i)^1.5
        for layer in selora.adapter_layers(selora.apply(tiny_llama(), selora.LoRAConfig(r=4))):
            weight = original.get_submodule(layer).weight
            U, _, Vh = torch.linalg.svd(weight, full_matrices=False)
            weight.copy_(U @ torch.diag(1.0 / (1.0 + torch.arange(len(Vh))) ** 1.5) @ Vh)
    reference = logits(original, input_ids)
    models = {svd: selora.apply(copy.deepcopy(original), selora.LoRAConfig(r=4, init="pissa", init_svd=svd))
              for svd in ("full", "randomized")}
    assert relative_error(logits(models["randomized"], input_ids), reference) < 1e-5
    full, fast = (selora.adapter_layers(models[svd]) for svd in ("full", "randomized"))
    errors = [relative_error(fast[name].delta_weight(), full[name].delta_weight()) for name in full]
    assert 0 < max(errors) < 1e-3, errors  # close, and not the full SVD's bits (it really took the other route)
    with pytest.raises(ConfigValueError, match="init_svd='fast'.*'randomized'"):
        selora.LoRAConfig(r=4, init="pissa", init_svd="fast")


def test_rslora_scaling(tiny_llama):
    plain = selora.apply(tiny_llama(), selora.LoRAConfig(r=4, alpha=8))
    stable = selora.apply(tiny_llama(), selora.LoRAConfig(r=4, alpha=8, use_rslora=True))
    assert all(layer.scaling == 2.0 for layer in selora.adapter_layers(plain).values())
    assert all(layer.scaling == 4.0 for layer in selora.adapter_layers(stable).values())


def test_index_sets_are_one_per_factor_shape_and_seeded(tiny_llama):
    """The paper's global shared index set: every factor of a shape holds the same IndexSet object (drawn from the
    seed and the shape alone); another seed draws another set."""
    def index_sets(seed):
        model = selora.apply(tiny_llama(), selora.SeLoRAConfig(r=4, seed=seed))
        return [f.index_set for l in selora.adapter_layers(model).values() for f in (l.lora_A, l.lora_B)]

    first, again, other = index_sets(0), index_sets(0), index_sets(1)
    by_shape = {}
    for index_set in first:
        by_shape.setdefault((index_set.rows, index_set.length), set()).add(id(index_set))
    assert all(len(ids) == 1 for ids in by_shape.values()) and len(by_shape) >= 3
    for a, b, c in zip(first, again, other):
        assert torch.equal(a.indices, b.indices)
        assert not torch.equal(a.indices, c.indices)


# ----- parameter counts -----------------------------------------------------------------------------------------
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000)
# (in, out) of each projection in one LLaMA-7B block
LLAMA_7B_SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                   "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}
LLAMA_7B_BASE_PARAMETERS = 6_738_415_616  # embeddings + 32 blocks + final norm + untied lm_head


def lora_formula(r, modules, layers=32):
    return r * layers * sum(sum(LLAMA_7B_SHAPES[m]) for m in modules)


def selora_formula(r, ratio, modules, layers=32):
    """2-D bases: floor(ratio * r * length) entries per factor."""
    return layers * sum(math.floor(ratio * r * n_in) + math.floor(ratio * r * n_out) for n_in, n_out in
                        (LLAMA_7B_SHAPES[m] for m in modules))


def selora_rows_formula(r, ratio, modules, layers=32):
    """Row-wise bases: round(ratio * length) entries per row."""
    return r * layers * sum(round(ratio * n_in) + round(ratio * n_out) for n_in, n_out in
                            (LLAMA_7B_SHAPES[m] for m in modules))


def meta_llama_7b():
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA_7B))


@pytest.mark.parametrize("config, expected", [
    (selora.LoRAConfig(r=8), 8 * 32 * (4 * (4096 + 4096) + 3 * (4096 + 11008))),
    (selora.SeLoRAConfig(r=8, spectral_ratio=0.3), selora_formula(8, 0.3, ATTENTION + MLP)),
    (selora.SeLoRAConfig(r=16, spectral_ratio=0.1, basis="dft_rows", shared_locations=False),
     selora_rows_formula(16, 0.1, ATTENTION + MLP)),
    (selora.LoRAConfig(r=8, use_dora=True), lora_formula(8, ATTENTION + MLP) + 32 * (4 * 4096 + 2 * 11008 + 4096)),
], ids=["lora-r8", "selora-r8-0.3", "selora-dft-r16-0.1", "lora-dora-r8"])
def test_count_parameters_llama_7b_on_meta(config, expected):
    start = time.perf_counter()
    model = selora.apply(meta_llama_7b(), config)
    counts = selora.count_parameters(model)
    assert time.perf_counter() - start < 20
    assert counts["trainable"] == expected
    assert counts["total"] == LLAMA_7B_BASE_PARAMETERS + expected
    assert sum(counts["per_module_type"].values()) == expected
    assert set(counts["per_module_type"]) == set(ATTENTION + MLP)
    table = selora.parameter_table(model)
    for module_type in ATTENTION + MLP:
        assert module_type in table
    assert f"{expected:,}" in table


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_count_parameters_quantized_tiny_llama(tiny_llama, kind):
    """Packed nf4 storage counts as 2 parameters a byte, so totals match the unquantized model."""
    plain = selora.count_parameters(selora.apply(tiny_llama(), selora.SeLoRAConfig(r=4)))
    quantized = selora.count_parameters(selora.apply(quantize_projections(tiny_llama(), kind), selora.SeLoRAConfig(r=4)))
    # r * layers * sum over the 7 projections of round(0.5 * in) + round(0.5 * out); (in + out) sums to 1120
    assert quantized["trainable"] == plain["trainable"] == 4 * 2 * 560
    assert quantized["total"] == plain["total"]


def test_lora_r32_qkv_up_down_matches_the_papers_setting():
    """LLM-Adapters / DoRA report "LoRA r=32" on q,k,v,up,down of LLaMA-7B as 0.83% trainable (~56.1M).

    r * 32 layers * (3 * (4096 + 4096) + 2 * (4096 + 11008)) = 56,098,816, and 56,098,816 / 6,738,415,616 (the
    base model's parameters) = 0.8325% -> "0.83%". (56,623,104 = 54 * 2**20 is not this count.) selora's own
    trainable_percent divides by base + adapter parameters, 0.8256%."""
    modules = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    model = selora.apply(meta_llama_7b(), selora.LoRAConfig(r=32, target_modules=modules))
    counts = selora.count_parameters(model)
    assert counts["trainable"] == lora_formula(32, modules) == 56_098_816
    assert round(100 * counts["trainable"] / LLAMA_7B_BASE_PARAMETERS, 2) == 0.83
    assert counts["trainable_percent"] == pytest.approx(100 * 56_098_816 / (LLAMA_7B_BASE_PARAMETERS + 56_098_816))


# ----- bad input -------------------------------------------------------------------------------------------------
def test_unknown_target_module_names_what_exists(tiny_llama):
    model = tiny_llama()
    before = model_snapshot(model)
    with pytest.raises(TargetModuleError) as error:
        selora.apply(model, selora.SeLoRAConfig(target_modules=("q_proj", "qkv_proj")))
    message = str(error.value)
    assert "qkv_proj" in message
    for name in ATTENTION + MLP:
        assert name in message
    assert_unchanged(model, before)


# k_proj is 64 -> 32 (2 kv heads of 16): r=33 fits o_proj (64x64) but not k_proj
@pytest.mark.parametrize("r, targets, culprit", [(33, ("o_proj", "k_proj"), "k_proj"), (65, ("q_proj",), "q_proj")])
def test_rank_larger_than_a_dimension(tiny_llama, r, targets, culprit):
    model = tiny_llama()
    before = model_snapshot(model)
    with pytest.raises(TargetModuleError, match=rf"r={r} is larger than .*{culprit}"):
        selora.apply(model, selora.LoRAConfig(r=r, target_modules=targets))
    assert_unchanged(model, before)


@pytest.mark.parametrize("ratio", [0, 1.5, -0.1])
def test_spectral_ratio_out_of_range(tiny_llama, ratio):
    model = tiny_llama()
    before = model_snapshot(model)
    with pytest.raises(ConfigValueError, match=rf"spectral_ratio={ratio}: must be in \(0, 1\]"):
        selora.apply(model, selora.SeLoRAConfig(spectral_ratio=ratio))
    assert_unchanged(model, before)


def test_dft_ratio_too_large(tiny_llama):
    model = tiny_llama()
    before = model_snapshot(model)
    # hidden 64 -> the dft_rows basis has 64 // 2 + 1 = 33 real frequencies; ratio 0.9 asks for 58
    with pytest.raises(ValueError, match=r"58 spectral coefficients .* length 64.* 'dft_rows' has only 33"):
        selora.apply(model, selora.SeLoRAConfig(basis="dft", spectral_ratio=0.9))
    assert_unchanged(model, before)
    assert selora.bases.get("dft_rows").count(4, 64, 0.5) == 4 * 32  # 0.5 fits: the usual setting works
    selora.apply(model, selora.SeLoRAConfig(basis="dft", spectral_ratio=0.5))


def test_apply_twice_is_refused(tiny_llama):
    model = selora.apply(tiny_llama(), selora.SeLoRAConfig(r=4))
    before = model_snapshot(model)
    with pytest.raises(TargetModuleError, match="already has a selora adapter"):
        selora.apply(model, selora.SeLoRAConfig(r=4))
    assert_unchanged(model, before)


def test_target_modules_given_as_one_string(tiny_llama):
    """One name given as a string means that one module (as LoRAConfig documents), not its letters."""
    config = selora.LoRAConfig(target_modules="q_proj")
    assert config.target_modules == ("q_proj",)
    model = selora.apply(tiny_llama(), config)
    assert sorted(selora.adapter_layers(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
