"""selora.io: save -> load is bit-exact (onto the base model or an already adapted one), export_lora loads in
PEFT with the same logits, and every way an adapter directory can be wrong is a clear AdapterFileError that
leaves the model untouched."""
import json
import shutil

import peft
import pytest
import torch

import selora
from selora.io import AdapterFileError

from conftest import assert_unchanged, model_snapshot, quantize_projections, relative_error

CONFIGS = {
    "lora": selora.LoRAConfig(r=4),
    "selora": selora.SeLoRAConfig(r=4),
    "selora-dft": selora.SeLoRAConfig(r=4, basis="dft_rows", shared_locations=False),
    "selora-dora": selora.SeLoRAConfig(r=4, use_dora=True),
    "selora-pissa": selora.SeLoRAConfig(r=4, init="pissa"),
    "selora-fft2": selora.SeLoRAConfig(r=4, basis="fft2"),
    "selora-bior-dora-pissa": selora.SeLoRAConfig(r=4, basis="bior2.2", use_dora=True, init="pissa"),
    "selora-dora-pissa": selora.SeLoRAConfig(r=4, use_dora=True, init="pissa"),
}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def trained(model, config, seed=0):
    """apply + a training-like random perturbation of every trainable tensor (B and DoRA magnitude included)."""
    selora.apply(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("onto", ["base-model", "applied-model"])
@pytest.mark.parametrize("name", ["lora", "selora", "selora-dft", "selora-dora-pissa", "selora-fft2"])
def test_save_load_is_bit_exact(tiny_llama, input_ids, tmp_path, name, onto):
    config = CONFIGS[name]
    model = trained(tiny_llama(), config)
    expected = logits(model, input_ids)
    assert relative_error(expected, logits(tiny_llama(), input_ids)) > 1e-3  # the adapter changes the output
    extra = {"score": torch.arange(5.0)}
    selora.save_adapter(model, tmp_path / "adapter", extra_state=extra)

    target = tiny_llama() if onto == "base-model" else selora.apply(tiny_llama(), config)
    loaded_extra = selora.load_adapter(target, tmp_path / "adapter")
    assert torch.equal(logits(target, input_ids), expected)
    assert torch.equal(loaded_extra["score"], extra["score"])
    saved, loaded = selora.adapter_state_dict(model), selora.adapter_state_dict(target)
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert {n for n, p in target.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
@pytest.mark.parametrize("name", ["selora", "selora-dora-pissa"])
def test_save_load_is_bit_exact_on_quantized_bases(tiny_llama, input_ids, tmp_path, name, kind):
    """Loading must not re-quantize the base unless the file records a change to it (it once replayed an
    empty record, which re-quantized nf4 bases and moved the logits by ~3e-4)."""
    model = trained(quantize_projections(tiny_llama(), kind), CONFIGS[name])
    expected = logits(model, input_ids)
    selora.save_adapter(model, tmp_path / "adapter")
    target = quantize_projections(tiny_llama(), kind)
    selora.load_adapter(target, tmp_path / "adapter")
    assert torch.equal(logits(target, input_ids), expected)
    for layer_name, layer in selora.adapter_layers(target).items():
        assert torch.equal(layer.base_delta_chunks, selora.adapter_layers(model)[layer_name].base_delta_chunks)


@pytest.mark.parametrize("name", ["lora", "selora", "selora-dft", "selora-dora", "selora-pissa", "selora-dora-pissa",
                                  "selora-bior-dora-pissa"])
def test_export_lora_loads_in_peft(tiny_llama, input_ids, tmp_path, name):
    model = trained(tiny_llama(), CONFIGS[name])
    expected = logits(model, input_ids)
    selora.export_lora(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == CONFIGS[name].use_dora
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    assert relative_error(logits(peft_model, input_ids), expected) < 1e-5


# ----- bad adapter directories ------------------------------------------------------------------------------------
@pytest.fixture
def saved(tiny_llama, tmp_path):
    """A valid SeLoRA adapter directory saved from the tiny LLaMA."""
    model = trained(tiny_llama(), CONFIGS["selora"])
    return selora.save_adapter(model, tmp_path / "adapter")


def copy_of(saved, tmp_path, name="broken"):
    return shutil.copytree(saved, tmp_path / name)


def assert_load_fails(model, directory, *fragments):
    before = model_snapshot(model)
    with pytest.raises(AdapterFileError) as error:
        selora.load_adapter(model, directory)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("applied", [False, True], ids=["base-model", "applied-model"])
def test_load_onto_model_with_other_shapes(tiny_llama, saved, applied):
    model = tiny_llama(hidden_size=32, intermediate_size=80)
    if applied:
        selora.apply(model, CONFIGS["selora"])
    assert_load_fails(model, saved, "'model.layers.0.self_attn.q_proj'", "expects in=64, out=64",
                      "module has in=32, out=32")


def test_load_onto_model_with_more_layers(tiny_llama, saved):
    """Every saved layer exists, but the config would adapt a third block that the file does not cover."""
    assert_load_fails(tiny_llama(num_hidden_layers=3), saved, "model.layers.2.")


def test_load_onto_model_applied_with_another_config(tiny_llama, saved):
    model = selora.apply(tiny_llama(), selora.SeLoRAConfig(r=4, spectral_ratio=0.25))
    assert_load_fails(model, saved, "'spectral_ratio': 0.25", "'spectral_ratio': 0.5", "load onto the base model")


def test_load_onto_merged_model_is_refused(tiny_llama, input_ids, saved):
    """Loading under a merged base used to be silent: the output kept the old merged update, and unmerge then
    subtracted the newly loaded one, corrupting the base."""
    model = trained(tiny_llama(), CONFIGS["selora"], seed=1)
    selora.merge(model)
    assert_load_fails(model, saved, "merged into the base", "selora.unmerge(model)")
    selora.unmerge(model)
    selora.load_adapter(model, saved)
    reference = tiny_llama()
    selora.load_adapter(reference, saved)
    # merge + unmerge left float rounding in the base (<1e-6), so close rather than bit-equal
    assert relative_error(logits(model, input_ids), logits(reference, input_ids)) < 1e-5


@pytest.mark.parametrize("damage", ["truncated", "zeroed-header", "random-bytes", "empty"])
def test_corrupt_weights_file(tiny_llama, saved, tmp_path, damage):
    broken = copy_of(saved, tmp_path)
    path = broken / "adapter_model.safetensors"
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "zeroed-header": bytes(8) + raw[8:],
                      "random-bytes": torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))
                      .to(torch.uint8).numpy().tobytes(), "empty": b""}[damage])
    assert_load_fails(tiny_llama(), broken, "adapter_model.safetensors cannot be read", "corrupt or truncated")


def test_missing_weights_file(tiny_llama, saved, tmp_path):
    broken = copy_of(saved, tmp_path)
    (broken / "adapter_model.safetensors").unlink()
    assert_load_fails(tiny_llama(), broken, "adapter_model.safetensors is missing")


def test_missing_config_file(tiny_llama, saved, tmp_path):
    broken = copy_of(saved, tmp_path)
    (broken / "adapter_config.json").unlink()
    assert_load_fails(tiny_llama(), broken, "adapter_config.json is missing", "not a complete selora adapter")


def test_missing_directory(tiny_llama, tmp_path):
    assert_load_fails(tiny_llama(), tmp_path / "nowhere", "nowhere", "does not exist")


def test_corrupt_config_json(tiny_llama, saved, tmp_path):
    broken = copy_of(saved, tmp_path)
    text = (broken / "adapter_config.json").read_text()
    (broken / "adapter_config.json").write_text(text[: len(text) // 2])
    assert_load_fails(tiny_llama(), broken, "adapter_config.json is not valid JSON", "corrupt")


def test_peft_directory_is_refused_with_a_hint(tiny_llama, tmp_path):
    model = trained(tiny_llama(), CONFIGS["selora"])
    selora.export_lora(model, tmp_path / "peft")
    assert_load_fails(tiny_llama(), tmp_path / "peft", "not a selora adapter config", "peft.PeftModel.from_pretrained")


def test_save_without_adapters_is_refused(tiny_llama, tmp_path):
    with pytest.raises(AdapterFileError, match="call selora.apply"):
        selora.save_adapter(tiny_llama(), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ----- compact SeLoRA files ---------------------------------------------------------------------------------
def test_selora_file_is_compact(tiny_llama, tmp_path):
    """At spectral_ratio 0.5 the adapter file is at most 0.55 x LoRA's: each factor stores only its entries, and the
    shared index set is stored once per factor shape, as a bit mask (not once per entry)."""
    sizes = {}
    for name, config in (("lora", selora.LoRAConfig(r=8)), ("selora", selora.SeLoRAConfig(r=8, spectral_ratio=0.5))):
        model = selora.apply(tiny_llama(), config)
        sizes[name] = (selora.save_adapter(model, tmp_path / name) / "adapter_model.safetensors").stat().st_size
    assert sizes["selora"] <= 0.55 * sizes["lora"], sizes
    meta = json.loads((tmp_path / "selora" / "adapter_config.json").read_text())
    shapes = {(f.index_set.rows, f.index_set.length) for layer in selora.adapter_layers(model).values()
              for f in (layer.lora_A, layer.lora_B)}
    assert len(meta["index_sets"]) == len(shapes) == 3  # (8, 64), (8, 160), (8, 32) on the tiny model


def v1_adapter_directory(basis: str, tmp_path):
    """The pre-0.2 adapter of tests/data/adapter_v1_<basis> as selora wrote it: its JSON config, and its two
    safetensors files rebuilt from tensors.json (the exact values, kept as text in the repository)."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    source = Path(__file__).parent / "data" / f"adapter_v1_{basis}"
    directory = tmp_path / f"adapter_v1_{basis}"
    directory.mkdir()
    shutil.copy(source / "adapter_config.json", directory)
    for name, tensors in json.loads((source / "tensors.json").read_text()).items():
        save_file({key: torch.tensor(t["values"], dtype=getattr(torch, t["dtype"])).reshape(t["shape"])
                   for key, t in tensors.items()}, str(directory / f"{name}.safetensors"))
    return directory


@pytest.mark.parametrize("basis", ["dct", "dft"])
def test_adapters_saved_before_the_2d_bases_still_load(tiny_llama, input_ids, basis, tmp_path):
    """tests/data/adapter_v1_*: written by selora before 0.2 (per-row coefficients and locations, basis "dct" /
    "dft", per-layer locations) with the logits it computed; they load as dct_rows / dft_rows and compute the same."""
    directory = v1_adapter_directory(basis, tmp_path)
    model = tiny_llama()
    extra = selora.load_adapter(model, directory)
    assert model.selora_config.basis == f"{basis}_rows"
    torch.testing.assert_close(logits(model, input_ids), extra["expected_logits"], rtol=1e-5, atol=1e-5)
