"""Inference on a base or fine-tuned model: loading (base + a selora or PEFT adapter dir), batched greedy
generation, answer scoring by log-likelihood, and number extraction for arithmetic answers.

One implementation for launch/evaluate.py, launch/generate.py and the end of a training run (base vs fine-tuned
answers). Prompts and scored answers are tokenized by recipes/data.py's `encode_record`, exactly as in training.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import selora
from recipes.compiled_regions import eager_for_generation
from recipes.data import IGNORE_INDEX, encode_prompt, encode_record
from recipes.modeling import load_model, load_tokenizer

ADAPTER_CONFIG = "adapter_config.json"
# Arithmetic answers are right when |predicted - gold| <= max(ABS_TOLERANCE, REL_TOLERANCE * |gold|).
ABS_TOLERANCE, REL_TOLERANCE = 1e-3, 1e-4
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?|-?\.\d+)", re.IGNORECASE)


class InferenceError(ValueError):
    """An adapter dir or input the inference tools cannot use; the message names it and the fix."""


# ----- loading -------------------------------------------------------------------------------------------------
def adapter_kind(directory: str | Path) -> str:
    """"selora" or "peft", from the adapter dir's adapter_config.json (both formats use that file name)."""
    config_path = Path(directory) / ADAPTER_CONFIG
    if not Path(directory).is_dir():
        raise InferenceError(f"adapter dir {str(directory)!r} does not exist; pass the folder a run wrote "
                             "(runs/<recipe>/adapter or runs/<recipe>/peft_adapter)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise InferenceError(f"adapter dir {str(directory)!r} has no readable {ADAPTER_CONFIG}; it is neither a "
                             "selora adapter (selora.save_adapter) nor a PEFT adapter (save_pretrained)") from None
    if config.get("format") == "selora-adapter":
        return "selora"
    if "peft_type" in config:
        return "peft"
    raise InferenceError(f"{config_path} is neither a selora adapter config (format: selora-adapter) nor a PEFT "
                         "one (peft_type); pass an adapter dir written by selora or PEFT")


def recorded_base(directory: str | Path) -> dict:
    """The base model an adapter dir names: {"path": ...} or {"preset": ..., "seed": ...}; {} when it names none
    (selora adapters carry it in their config's extra.base_model, PEFT ones in base_model_name_or_path)."""
    config = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
    if config.get("format") == "selora-adapter":
        return dict(config.get("extra", {}).get("base_model") or {})
    path = config.get("base_model_name_or_path")
    return {"path": path} if path and Path(path).exists() else {}


def base_model_record(model_cfg) -> dict:
    """What an adapter records about its base so evaluation can rebuild it: the path, or the preset and seed."""
    if model_cfg.path:
        return {"path": str(Path(model_cfg.path).resolve())}
    return {"preset": str(model_cfg.preset), "seed": int(model_cfg.seed)}


def load_for_inference(model_cfg, tokenizer_cfg, adapter_dir: str | None, device: torch.device, merge: bool = False):
    """(model in eval mode, tokenizer): the base ``model_cfg`` names, with the adapter of ``adapter_dir`` on it
    (a selora adapter through selora.load_adapter, a PEFT one through peft.PeftModel.from_pretrained).
    ``merge``: the adapter written into the base weights (selora.merge / PEFT's merge_and_unload), so a forward
    costs what the base model's does (no factor decode, no DoRA norm)."""
    kind = adapter_kind(adapter_dir) if adapter_dir else None
    tokenizer = load_tokenizer(tokenizer_cfg, model_cfg)
    model, _ = load_model(model_cfg, device)
    if kind == "selora":
        selora.load_adapter(model, adapter_dir)
        if merge:
            selora.merge(model)
    elif kind == "peft":
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        if merge:
            model = model.merge_and_unload()
    return model.eval(), tokenizer


# ----- generation ----------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, text: str, chat: bool = False) -> list[int]:
    """A free-text prompt as the training data would frame it: an alpaca instruction, or (``chat``) a user
    turn of the tokenizer's chat template."""
    if chat:
        record = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
    else:
        record = {"instruction": text, "input": "", "output": ""}
    return encode_prompt(record, tokenizer)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
             synced_gpus: bool = False, progress=None) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of token-id prompts, ``batch_size`` at a time,
    left-padded. ``synced_gpus``: every rank of a ZeRO-3 run must call with the same number of prompts."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with eager_for_generation():  # a trained model's compiled regions (model.compile) would recompile per token
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, use_cache=True, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=synced_gpus)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        if progress is not None:
            progress.update(len(batch))
    return answers


def answer_prompts(model: nn.Module, tokenizer, texts: list[str], max_new_tokens: int = 64,
                   synced_gpus: bool = False) -> list[str]:
    """Greedy answers to free-text prompts framed as training frames alpaca records; model left as found
    (train/eval mode)."""
    was_training = model.training
    model.eval()
    try:
        return generate(model, tokenizer, [prompt_ids(tokenizer, t) for t in texts], max_new_tokens,
                        synced_gpus=synced_gpus)
    finally:
        model.train(was_training)


# ----- scoring -------------------------------------------------------------------------------------------------
@torch.no_grad()
def answer_losses(model: nn.Module, examples: list[tuple[list[int], list[int]]], pad_token_id: int,
                  batch_size: int = 8, progress=None) -> list[tuple[float, int]]:
    """(summed negative log-likelihood in nats, number of target tokens) per (input_ids, labels) example:
    the training loss's terms (labels -100 are not scored; the model predicts token t+1 from tokens <= t)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad_token_id] * (width - len(i)) for i, _ in batch], device=device)
        labels = torch.tensor([l + [IGNORE_INDEX] * (width - len(l)) for _, l in batch], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        out += [(float(s), int(c)) for s, c in zip(nll.double().sum(dim=1).tolist(), counts.tolist())]
        if progress is not None:
            progress.update(len(batch))
    return out


def scored_example(record: dict, tokenizer, output: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of ``record`` answered with ``output``, tokenized exactly as in training."""
    ids, labels, _ = encode_record({**record, "output": output}, tokenizer)
    return ids, labels


# ----- arithmetic answers --------------------------------------------------------------------------------------
def extract_number(text: str) -> float | None:
    """The number after the last "The answer is" in ``text``, else its last number, else None."""
    stated = ANSWER_IS.findall(text)
    candidates = stated or NUMBER.findall(text)
    if not candidates:
        return None
    try:
        return float(candidates[-1].replace(",", ""))
    except ValueError:
        return None


def numbers_match(predicted: float | None, gold: float) -> bool:
    return predicted is not None and abs(predicted - gold) <= max(ABS_TOLERANCE, REL_TOLERANCE * abs(gold))


def format_comparison(prompts: list[str], base: list[str] | None, tuned: list[str]) -> str:
    """Base vs fine-tuned answers, prompt by prompt, for the end of a training run."""
    lines = []
    for index, prompt in enumerate(prompts):
        lines += [f"--- prompt {index + 1}: {prompt.strip()}"]
        if base is not None:
            lines += [f"base model: {base[index].strip()}"]
        lines += [f"fine-tuned: {tuned[index].strip()}"]
    return "\n".join(lines)
