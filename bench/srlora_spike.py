"""Why SRLoRA's training loss jumps after a recomposition, measured on SmolLM2-135M-Instruct on CPU.

    python bench/srlora_spike.py --model-path DIR_OR_GGUF [--steps-before 20] [--steps-after 6] [--lr 1e-3]
    python bench/srlora_spike.py --model-path /tmp/smollm2/hf --device cuda --steps-before 100 --steps-after 10 \
        --micro-batch 16 --max-length 256 --dtype bfloat16 --warmup 10 --out $OUT/srlora_spike.json  # as the study

Trains LoRA r16 (SRLoRA scoring on) for ``--steps-before`` steps, then branches from that one state, each branch
seeing the same batches afterwards:
  lora          no recomposition (the reference)
  srlora        recomposition as selora does it (half the pairs fused and re-initialised; their Adam moments zeroed)
  keep-moments  the same recomposition, Adam moments of the re-initialised rows left as they were
  warm-v        the same recomposition, first moments zeroed, second moments set to the mean of the layer's other rows
and prints, per branch: the loss on a fixed probe batch right before and right after the recomposition (the function
must not change), the training loss of each step after it, and the size of the first update of the re-initialised
rows against that of the other rows. The new pairs' norms are printed against the trained pairs'.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import selora  # noqa: E402
from launch.config import resolve  # noqa: E402
from recipes.validate import adapter_config_from  # noqa: E402
from recipes.data import load_records, make_collate_fn, tokenize_records  # noqa: E402
from recipes.engine import ADAMW_BETAS, ADAMW_EPS  # noqa: E402
from recipes.modeling import load_model, load_tokenizer  # noqa: E402
from selora.inject import adapter_layers  # noqa: E402
from selora.srlora import SRLoRA  # noqa: E402


def batches(path: Path, tokenizer, max_length: int, micro: int, count: int, seed: int, device) -> list[dict]:
    """``count`` micro-batches of math records (the recipe's tokenization, prompt masked), in a seeded order."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    from recipes.data import encode_prompt
    # math records whose prompt leaves at least 24 answer tokens (the worked answer is cut at max_length)
    math_records = [r for r in records if r["answer"].replace(".", "", 1).lstrip("-").isdigit()
                    and len(encode_prompt(r, tokenizer)) <= max_length - 24]
    scratch = Path("/tmp/srlora_spike_records.jsonl")
    scratch.write_text("".join(json.dumps(r) + "\n" for r in math_records))
    data = tokenize_records(load_records(str(scratch)), tokenizer, max_length)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    collate = make_collate_fn(tokenizer.pad_token_id)
    order = (order * (1 + count * micro // len(order)))[:count * micro]  # wrap around for long runs
    return [{k: v.to(device) for k, v in collate([data[i] for i in order[k * micro:(k + 1) * micro]]).items()}
            for k in range(count)]


def loss_of(model, batch: dict) -> float:
    with torch.no_grad():
        return model(**batch).loss.item()


def train_step(model, optimizer, batch: dict, srlora: SRLoRA | None) -> float:
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if srlora is not None:
        srlora.update_scores()
    return loss.item()


def warm_second_moments(optimizer, srlora: SRLoRA, chosen: dict[int, torch.Tensor]) -> None:
    """The warm-v variant: re-initialised rows get zero first moments and the mean second moment of their
    layer's other rows."""
    layers = list(srlora.layers.values())
    for index, pairs in chosen.items():
        for factor in (layers[index].lora_A, layers[index].lora_B):
            state = optimizer.state[factor.param]
            keep = torch.ones(state["exp_avg_sq"].shape[0], dtype=torch.bool)
            keep[pairs] = False
            state["exp_avg"][pairs] = 0
            state["exp_avg_sq"][pairs] = state["exp_avg_sq"][keep].mean(0)


def branch(name: str, snapshot, steps: list[dict], probe: dict, step_before: int) -> dict:
    model, optimizer, srlora = copy.deepcopy(snapshot)
    result = {"branch": name, "probe_before": loss_of(model, probe)}
    chosen = {}
    if name != "lora":
        chosen = srlora.choose_pairs()
        before = {i: (srlora.layer_list[i].lora_A.param.detach().clone(), srlora.layer_list[i].lora_B.param.detach().clone())
                  for i in chosen}
        srlora.recompose(step_before, optimizer if name != "keep-moments" else None)
        if name == "warm-v":
            warm_second_moments(optimizer, srlora, chosen)
        new_norm, old_norm, kept_norm = [], [], []
        for i, pairs in chosen.items():
            layer = srlora.layer_list[i]
            keep = torch.ones(layer.r, dtype=torch.bool)
            keep[pairs] = False
            rows = layer.pair_rows()
            new_norm.append(rows[pairs].norm(dim=1).mean().item())
            kept_norm.append(rows[keep].norm(dim=1).mean().item())
            old_norm.append(torch.cat([before[i][0], before[i][1]], 1)[pairs].norm(dim=1).mean().item())  # B^T rows
        result.update(new_pair_norm=sum(new_norm) / len(new_norm), replaced_pair_norm=sum(old_norm) / len(old_norm),
                      kept_pair_norm=sum(kept_norm) / len(kept_norm))
    result["probe_after_recomposition"] = loss_of(model, probe)
    losses, probes = [], []
    for k, batch in enumerate(steps):
        params = {i: (srlora.layer_list[i].lora_A.param.detach().clone(), srlora.layer_list[i].lora_B.param.detach().clone())
                  for i in range(len(srlora.layer_list))} if k == 0 else None
        losses.append(train_step(model, optimizer, batch, None))
        probes.append(loss_of(model, probe))
        if k == 0 and chosen:  # first update: re-initialised rows vs the other rows, mean |delta| per element
            moved_new, moved_other = [], []
            for i, pairs in chosen.items():
                layer = srlora.layer_list[i]
                keep = torch.ones(layer.r, dtype=torch.bool)
                keep[pairs] = False
                for old, param in zip(params[i], (layer.lora_A.param, layer.lora_B.param)):
                    delta = (param.detach() - old).abs()
                    delta = delta if delta.shape[0] == layer.r else delta.T
                    moved_new.append(delta[pairs].mean().item())
                    moved_other.append(delta[keep].mean().item())
            result["first_update_new_rows"] = sum(moved_new) / len(moved_new)
            result["first_update_other_rows"] = sum(moved_other) / len(moved_other)
    result.update(train_loss_after=losses, probe_after_steps=probes)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", default=str(ROOT / ".quality" / "smollm2" / "data" / "train.jsonl"))
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--init", default="default", choices=("default", "pissa"))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps-before", type=int, default=20)
    parser.add_argument("--steps-after", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--branches", default="lora,srlora,keep-moments,warm-v")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--svd", default="randomized", choices=("full", "randomized"),
                        help="principal directions (randomized: seconds on a CPU; the study uses full on the GPU)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="of the base model (the study trains in bfloat16 on a GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    started = time.time()
    cfg = resolve("llama_srlora", [f"model.path={args.model_path}", f"model.dtype={args.dtype}", f"adapter.r={args.r}",
                                   f"adapter.alpha={2 * args.r}", f"adapter.init={args.init}", "adapter.dropout=0.0"])
    model, _ = load_model(cfg.model, device)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    selora.apply(model, adapter_config_from(cfg.adapter))
    srlora = SRLoRA(model, selora.SRLoRAConfig(start_step=args.steps_before, end_step=args.steps_before,
                                                interval=args.steps_before, pairs_per_recomposition=args.pairs,
                                                svd=args.svd))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0)
    data = batches(Path(args.data), tokenizer, args.max_length, args.micro_batch, args.steps_before + args.steps_after + 1, 0, device)
    probe = data[-1]
    warmup = args.warmup
    for step, batch in enumerate(data[:args.steps_before]):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup)
        loss = train_step(model, optimizer, batch, srlora)
        print(f"step {step + 1}: loss {loss:.4f} ({time.time() - started:.0f} s)", flush=True)
    print(f"{len(adapter_layers(model))} adapted layers; branching at step {args.steps_before}", flush=True)
    snapshot = (model, optimizer, srlora)
    results = []
    for name in args.branches.split(","):
        results.append(branch(name, snapshot, data[args.steps_before:args.steps_before + args.steps_after], probe,
                              args.steps_before))
        r = results[-1]
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v] if isinstance(v, list) else v)
                          for k, v in r.items()}), flush=True)
    reference = next((r for r in results if r["branch"] == "lora"), None)
    if reference:
        print("\nbranch        | probe jump at recomposition | train loss - LoRA's, steps after | first update new/other rows")
        for r in results:
            gaps = [a - b for a, b in zip(r["train_loss_after"], reference["train_loss_after"])]
            ratio = (r["first_update_new_rows"] / r["first_update_other_rows"]) if "first_update_new_rows" in r else float("nan")
            print(f"{r['branch']:13s} | {r['probe_after_recomposition'] - r['probe_before']:+.2e} | "
                  + " ".join(f"{g:+.3f}" for g in gaps) + f" | {ratio:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
