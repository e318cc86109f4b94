"""Where the recipe's extra step time comes from, in one process on one GPU: the same random tokens through

- the plain PEFT loop's model and step (transformers + PEFT LoRA, HF checkpointing, fused AdamW, clipping);
- the recipe's model, adapters and plain engine (``load_model`` + ``selora.apply`` + ``PlainEngine``) on the
  same padded rows, without the recipe's data pipeline and logging;
- the same recipe model on the same tokens as one padding-free row (positions restarting every ``--seq`` tokens,
  the examples' boundaries passed on), with each attention ``model.attention`` offers for it;
- the same with SRLoRA's per-step work (gradient hooks and scoring; no recomposition), against the row above it.

If the recipe's model and engine match the PEFT loop here while ``bench/recipe_vs_peft.py``'s recipe rows do not,
the difference is in the loop around them (data, logging); if the padding-free rows are slower than the padded
ones here, it is in the attention path. Rows are interleaved over ``--rounds`` (the machine drifts); a row's time
is the median over rounds of its round median.

    python bench/host_overhead.py                      # GPU, the 1.3B bench shape, 8 x 256
    python bench/host_overhead.py --smoke              # CPU, tiny, seconds
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from recipe_vs_peft import PeftLoop  # noqa: E402


def peft_step(args, device, dtype, ids):
    """bench/recipe_vs_peft.py's plain PEFT loop, one step on ``ids`` per call."""
    loop = PeftLoop(argparse.Namespace(**{**vars(args), "warmup": 0, "steps": 0}), device, dtype)
    loop.model.train()
    return lambda: loop.step(ids)


def recipe_step(args, device, attention: str, inputs: dict, recipe: str = "llama_lora"):
    import selora
    from launch.config import resolve
    from recipes.engine import PlainEngine
    from recipes.modeling import load_model
    from recipes.packed_attention import use_attention
    from recipes.validate import validate
    cfg = resolve(recipe, [f"model.preset={args.shape}", "model.path=null", "model.gradient_checkpointing=true",
                                 f"adapter.r={args.rank}", f"adapter.alpha={2 * args.rank}", "adapter.dropout=0.0",
                                 "train.max_grad_norm=1.0", "train.warmup_steps=0", "train.max_steps=1000",
                                 # scoring every step, no recomposition within the bench (its cost is amortised
                                 # over the interval: bench/recipe_vs_peft.py times it)
                                 "srlora.schedule=fixed", "srlora.start_step=1000", "srlora.end_step=1000",
                                 "srlora.svd=randomized"])
    adapter_config, srlora_config = validate(cfg)
    model, _ = load_model(cfg.model, device)
    use_attention(model, attention)
    selora.apply(model, adapter_config)
    srlora = None
    if srlora_config is not None:
        from selora.srlora import SRLoRA
        srlora = SRLoRA(model, srlora_config, total_steps=1000)
    engine = PlainEngine(model, cfg, 1000)
    engine.train()

    def step():
        loss = engine(**inputs).loss
        engine.backward(loss)
        engine.step()
        if srlora is not None:
            srlora.step(1, engine.optimizer)  # step 1: scores only (the schedule starts at 1000)
        return loss.item()
    return step


def padding_free_inputs(ids: torch.Tensor) -> dict:
    """The padded rows (batch, seq) as one row of batch * seq tokens, one example per former row."""
    batch, seq = ids.shape
    row = ids.reshape(1, -1)
    labels = row.clone()
    labels[0, ::seq] = -100  # no example predicts the next one's first token: the padded rows' loss exactly
    bounds = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=ids.device)
    return {"input_ids": row, "labels": labels, "use_cache": False,
            "position_ids": torch.arange(seq, device=ids.device).repeat(batch)[None],
            "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": seq, "max_length_k": seq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama_1b_bench")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny preset, few steps")
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.batch, args.seq, args.steps, args.rounds, args.rank = "tiny_llama", 2, 64, 3, 2, 8
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from recipes.modeling import preset_config
    vocab = preset_config(args.shape)["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    padded = {"input_ids": ids, "labels": ids, "use_cache": False}
    flat = padding_free_inputs(ids)
    rows = {
        "PEFT loop (padded rows)": lambda: peft_step(args, device, dtype, ids),
        "recipe model + engine (padded rows)": lambda: recipe_step(args, device, "sdpa", padded),
        "recipe, padding-free row, varlen (aten flash)": lambda: recipe_step(args, device, "selora_varlen", flat),
        "recipe, padding-free row, SDPA + block mask": lambda: recipe_step(args, device, "sdpa", flat),
        "recipe + SRLoRA scoring, padding-free row, SDPA + block mask":
            lambda: recipe_step(args, device, "sdpa", flat, "llama_srlora"),
    }
    if device.type != "cuda":  # the CPU varlen path is the per-example reference, not a speed candidate
        rows.pop("recipe, padding-free row, varlen (aten flash)")
    steps, losses = {}, {}
    for name, build in rows.items():  # all resident at once, so the rounds can interleave them
        steps[name] = build()
        losses[name] = steps[name]()
    times = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, step in steps.items():
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                samples.append(time.perf_counter() - start)
            times[name].append(statistics.median(samples))
    base = statistics.median(times["PEFT loop (padded rows)"])
    name_width = max(map(len, rows))
    print(f"{args.shape} {args.batch}x{args.seq} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print(f"{'row':<{name_width}}  step ms  x PEFT step time  first loss  (rounds)")
    for name in rows:
        median = statistics.median(times[name])
        rounds = ", ".join(f"{1e3 * t:.1f}" for t in times[name])
        print(f"{name:<{name_width}}  {1e3 * median:7.1f}  {median / base:16.2f}  {losses[name]:10.4f}  ({rounds})")


if __name__ == "__main__":
    main()
