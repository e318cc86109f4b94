"""model.fused_loss: when the training loss skips the logits, and that the routed forward gives the losses the
replaced path gives.

liger-kernel's kernel needs a GPU (triton); here the route is tested with a plain-torch loss of the same contract
swapped in (as test_compiled_regions swaps inductor for aot_eager), so what is checked is everything selora adds:
which calls go through the fused loss, the decoder's inputs (padding-free boundaries included), the shift, the
ignored labels and the division by the step's learned tokens under gradient accumulation. liger's own numbers
against transformers' are checked on a GPU by bench/fused_loss_check.py and recipe_vs_peft.py's first losses."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from launch.config import resolve
from recipes import finetune, fused_loss, validate as validation
from recipes.fused_loss import FusedLossConfigError, fused_loss_choice, use_fused_loss
from recipes.validate import RecipeConfigError, validate

from conftest import SMALL_RUN

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def reference_loss(hidden, weight, labels, num_items_in_batch):
    """Logits, then the shifted cross-entropy: what liger computes without the logits."""
    logits = (hidden @ weight.T).float()
    targets = labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())


def test_auto_fuses_on_a_gpu_with_liger_under_every_engine(monkeypatch):
    monkeypatch.setattr(fused_loss, "liger_available", lambda: None)
    assert fused_loss_choice("auto", CUDA, 0)[0] and fused_loss_choice("auto", CUDA, 2)[0]
    assert fused_loss_choice(True, CUDA, 2) == (True, "model.fused_loss=true: output layer and cross-entropy fused "
                                                      "(liger-kernel; no logits are kept)")
    assert fused_loss_choice("auto", CUDA, 3) == (True, "model.fused_loss=auto: output layer and cross-entropy fused "
                                                        "(liger-kernel; no logits are kept; under ZeRO-3 DeepSpeed "
                                                        "gathers the output weight for it)")
    assert not fused_loss_choice(False, CUDA, 0)[0]
    monkeypatch.setattr(fused_loss, "liger_available", lambda: "no liger_kernel: pip install 'selora[gpu]'")
    on, line = fused_loss_choice("auto", CUDA, 0)
    assert not on and line.endswith("(no liger_kernel: pip install 'selora[gpu]')")


def test_a_wrong_or_impossible_value_fails_before_anything_loads():
    with pytest.raises(RecipeConfigError, match=r"model.fused_loss='fast': choose one of auto, true, false"):
        validate(resolve("llama_lora", SMALL_RUN + ["model.fused_loss=fast"]), device=CPU)
    with pytest.raises(RecipeConfigError, match=r"model.fused_loss=true cannot run here \(not on a GPU\); set "
                                                r"model.fused_loss=auto or false"):
        validate(resolve("llama_lora", SMALL_RUN + ["model.fused_loss=true"]), device=CPU)
    assert not validate(resolve("llama_lora", SMALL_RUN), device=CPU).fused_loss


def test_the_routed_forward_gives_transformers_loss_and_leaves_generation_alone(tiny_llama, monkeypatch):
    monkeypatch.setattr(fused_loss, "LOSS", reference_loss)
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    expected = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(7.0)).loss
    logits = model(input_ids=ids).logits
    assert use_fused_loss(model, "fused", required=True) == "fused"
    routed = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(7.0))
    assert routed.logits is None  # no logits were made
    assert routed.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert model(input_ids=ids, labels=labels).loss.item() == pytest.approx(
        reference_loss(model.model(input_ids=ids).last_hidden_state, model.lm_head.weight, labels, None).item())
    assert torch.equal(model(input_ids=ids).logits, logits)  # label-free calls (generation) keep the logits


def test_a_model_that_cannot_be_fused_keeps_its_logits_or_is_refused_when_fusion_was_asked(tiny_llama):
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0  # as Gemma 2
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids, labels=ids).loss
    assert use_fused_loss(model, "fused", required=False) == ("model.fused_loss=auto: logits, then transformers' "
                                                              "cross-entropy (LlamaForCausalLM caps its logits)")
    assert torch.equal(model(input_ids=ids, labels=ids).loss, expected)  # forward untouched
    model.lm_head = torch.nn.Linear(64, 128, bias=True)
    with pytest.raises(FusedLossConfigError, match=r"model.fused_loss=true: LlamaForCausalLM has no decoder \(.model\) "
                                                   r"and bias-free output layer \(.lm_head\); set model.fused_loss=auto "
                                                   r"or false"):
        use_fused_loss(model, "fused", required=True)


def losses(path) -> list[float]:
    return [line["loss"] for line in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
            if "loss" in line]


def test_a_fused_run_trains_as_the_unfused_one(tmp_path, monkeypatch):
    """Padding-free batches, two micro-batches per step (the loss over the step's learned tokens), evaluation and
    the sample answers (generation) in the same run."""
    monkeypatch.setattr(fused_loss, "LOSS", reference_loss)
    routed = []
    monkeypatch.setattr(finetune, "use_fused_loss",
                        lambda model, *args, **kwargs: routed.append(model) or use_fused_loss(model, *args, **kwargs))
    choice = validation.fused_loss_choice
    monkeypatch.setattr(validation, "fused_loss_choice",  # as on a GPU with liger: the choice, not the device
                        lambda setting, device, stage: choice(setting, CUDA, stage) if str(setting).lower() == "true"
                        else choice(setting, device, stage))
    monkeypatch.setattr(fused_loss, "liger_available", lambda: None)
    runs = {}
    for setting in ("false", "true"):
        out = tmp_path / setting
        finetune.run(resolve("llama_selora", SMALL_RUN + [
            "train.max_steps=3", "train.save_every=0", "train.gradient_accumulation_steps=2",
            "train.micro_batch_size=2", "data.padding_free=true", "train.eval_every=3", f"model.fused_loss={setting}",
            f"train.output_dir={out}"]))
        runs[setting] = losses(out)
    assert len(routed) == 1  # only the fused run
    assert len(runs["true"]) == len(runs["false"]) >= 3
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-5, abs=1e-6)
