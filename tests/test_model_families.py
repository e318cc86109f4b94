"""Each supported model family (recipes/modeling.py's SUPPORTED_TYPES) on a tiny random model built from
transformers' own config class: selora adapters go on its projections, a few steps lower the loss, the merged
model gives the unmerged outputs, the PEFT export loads in PEFT with the same logits, save/load round-trips,
gradient checkpointing gives the same gradients, and packed rows (padding-free batches) attend inside each
example with the attention the recipe picks for the family (varlen refused where it would be inexact)."""
import json

import peft
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

import selora
from recipes.modeling import FUSED_PROJECTIONS, SUPPORTED_TYPES, ModelLoadError, check_target_modules
from recipes.packed_attention import AttentionConfigError, attention_for_model, use_attention

from conftest import relative_error

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Small windows and a strong soft-cap, so that attention which ignored them would show.
FAMILY_SETTINGS = {"gemma2": dict(sliding_window=4, attn_logit_softcapping=2.0), "gemma3_text": dict(sliding_window=4),
                   "mistral": dict(sliding_window=4)}
CPU = torch.device("cpu")


def tiny(model_type: str):
    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **FAMILY_SETTINGS.get(model_type, {}))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


def targets(model_type: str) -> list[str]:
    fused = FUSED_PROJECTIONS.get(model_type, {})
    parts = {part: whole for whole, names in fused.items() for part in names}
    return list(dict.fromkeys(parts.get(name, name) for name in PROJECTIONS))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_family_trains_merges_exports_and_packs(model_type, tmp_path):
    config = selora.SeLoRAConfig(r=4, target_modules=targets(model_type))
    model = selora.apply(tiny(model_type), config)
    assert len(selora.adapter_layers(model)) == 2 * len(config.target_modules)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))

    # Gradient checkpointing: the same gradients.
    def gradients(checkpointing: bool):
        if checkpointing:
            selora.enable_gradient_checkpointing(model)
        model.train()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        return grads
    plain, checkpointed = gradients(False), gradients(True)
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-6, rtol=1e-5), name

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    expected = logits(model, ids)
    assert relative_error(expected, logits(tiny(model_type), ids)) > 1e-3  # the adapter changed the model

    selora.export_lora(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"] == \
        sorted(selora.adapter_layers(model))
    peft_model = peft.PeftModel.from_pretrained(tiny(model_type), tmp_path / "peft").eval()
    assert relative_error(logits(peft_model, ids), expected) < 1e-5

    selora.save_adapter(model, tmp_path / "adapter")
    loaded = tiny(model_type)
    selora.load_adapter(loaded, tmp_path / "adapter")
    assert torch.equal(logits(loaded, ids), expected)

    # Two examples packed into one row with restarting positions give each example's own logits.
    flat = torch.cat([ids[:1, :5], ids[1:, :7]], 1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    alone = torch.cat([logits(loaded, ids[:1, :5]), logits(loaded, ids[1:, :7])], 1)
    boundaries = dict(cu_seq_lens_q=torch.tensor([0, 5, 12]), cu_seq_lens_k=torch.tensor([0, 5, 12]),
                      max_length_q=7, max_length_k=7)
    for choice in ("auto", "varlen"):
        if choice == "varlen" and model_type in FAMILY_SETTINGS:  # soft-cap or a window shorter than an example
            with pytest.raises(AttentionConfigError, match="set model.attention=auto"):
                attention_for_model(loaded, choice, True, CPU, max_length=16)
            continue
        name = attention_for_model(loaded, choice, True, CPU, max_length=16)
        use_attention(loaded, name)
        packed = logits(loaded, flat, position_ids=position_ids, **(boundaries if name != "sdpa" else {}))
        assert relative_error(packed, alone) < 1e-5, (choice, name)

    selora.merge(model)
    assert relative_error(logits(model, ids), expected) < 1e-5


def test_fused_projection_names_and_unsupported_families_are_named(tmp_path):
    folder = tmp_path / "phi3"
    tiny("phi3").config.save_pretrained(folder)
    model_cfg = OmegaConf.create({"path": str(folder), "preset": "tiny_llama"})
    with pytest.raises(ModelLoadError, match=r"phi3 model, whose projections are fused .*set "
                                             r"adapter.target_modules=\[qkv_proj,o_proj,gate_up_proj,down_proj\]"):
        check_target_modules(model_cfg, PROJECTIONS)
    check_target_modules(model_cfg, targets("phi3"))
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="selora recipes support llama, mistral, qwen2, qwen3, gemma, gemma2, "
                                             "gemma3_text, phi3"):
        check_target_modules(OmegaConf.create({"path": str(tmp_path / "gpt")}), PROJECTIONS)
    gemma2 = tiny("gemma2")
    with pytest.raises(AttentionConfigError, match="no SDPA attention"):
        attention_for_model(gemma2, "sdpa", False, CPU, max_length=16)
    assert attention_for_model(gemma2, "auto", False, CPU, max_length=16) == "eager"
