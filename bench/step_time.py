"""Step time and peak memory on LLaMA-7B-shaped layers: HF PEFT LoRA (the baseline) vs selora LoRA, SeLoRA,
SRLoRA (recomposition cost amortised over the run) and SeLoRA at LoRA's parameter count, in one process on
one GPU, bf16 and 4-bit bases, gradient checkpointing on.

Random weights (nothing can be downloaded). Each configuration is measured with L1 and L2 decoder layers;
the difference gives the per-layer cost and the intercept the embedding/head cost, from which a 32-layer
step is extrapolated. Ratios are to PEFT LoRA measured in the same process.

    python bench/step_time.py                       # writes docs/benchmarks/step_time.{md,json}
    python bench/step_time.py --out $OUT --quick    # smaller run
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import selora  # noqa: E402
from selora.srlora import SRLoRA  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=4096)


def build_model(layers: int, quant: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(num_hidden_layers=layers, **LLAMA_7B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if quant == "4bit":
        from recipes.modeling import quantize_linears
        quantize_linears(model, "4bit", torch.bfloat16, "nf4")
        torch.cuda.empty_cache()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def attach(model, method: str, rank: int, total_steps: int):
    """Returns (model, srlora or None)."""
    selora.cache_decoded_factors(method.endswith("_cached"))
    if method == "peft_lora":
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(selora.LLAMA_PROJECTIONS))
        return get_peft_model(model, config), None
    if method == "selora_lora":
        return selora.apply(model, selora.LoRAConfig(r=rank, alpha=2 * rank)), None
    if method in ("selora_selora", "selora_selora_cached"):
        return selora.apply(model, selora.SeLoRAConfig(r=rank, alpha=2 * rank, spectral_ratio=0.5)), None
    if method in ("selora_selora_matched", "selora_selora_matched_cached"):  # r doubled at ratio 0.5: the same trainable count as LoRA at r
        return selora.apply(model, selora.SeLoRAConfig(r=2 * rank, alpha=4 * rank, spectral_ratio=0.5)), None
    if method == "selora_srlora":
        selora.apply(model, selora.LoRAConfig(r=rank, alpha=2 * rank))
        srlora = selora.SRLoRAConfig(start_step=5, end_step=total_steps, interval=5, svd="randomized")
        return model, SRLoRA(model, srlora, total_steps=total_steps)
    raise ValueError(method)


def measure(model, rec, batch: int, seq: int, warmup: int, steps: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randint(0, LLAMA_7B["vocab_size"], (batch, seq), device="cuda", generator=generator)
              for _ in range(4)]
    times = []
    for step in range(1, warmup + steps + 1):
        if step == warmup + 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ids = inputs[step % len(inputs)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rec is not None:
            rec.step(step, optimizer)
        torch.cuda.synchronize()
        if step > warmup:
            times.append(time.perf_counter() - start)
    return {"step_s_median": statistics.median(times), "step_s_mean": statistics.fmean(times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "trainable": sum(p.numel() for p in params), "final_loss": float(loss)}


def decode_cost(rank: int, repeats: int = 50) -> dict:
    """Time to decode (forward + backward) all 14 factors of one LLaMA-7B layer, vs that layer's matmuls."""
    from selora import spectral
    shapes = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    factors = []
    for in_f, out_f in shapes:
        for length in (in_f, out_f):
            count = round(0.5 * length)
            loc = spectral.draw_locations(length, count, rank, True, "dct", torch.Generator().manual_seed(0)).cuda()
            factors.append((torch.randn(rank, count, device="cuda", requires_grad=True), loc, length))

    def run():
        total = sum(spectral.SpectralDecode.apply(c, loc, n, "dct").sum() for c, loc, n in factors)
        total.backward()
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    torch.cuda.synchronize()
    return {"decode_fwd_bwd_ms_per_layer": 1000 * (time.perf_counter() - start) / repeats}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--layers", default="2,4")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quant", default="bf16,4bit")
    parser.add_argument("--methods", default="peft_lora,selora_lora,selora_selora,selora_selora_cached,selora_srlora,"
                                             "selora_selora_matched_cached")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.steps, args.seq = "1,2", 5, 256
    l1, l2 = (int(x) for x in args.layers.split(","))
    rows = []
    for quant in args.quant.split(","):
        for method in args.methods.split(","):
            by_layers = {}
            for layers in (l1, l2):
                model = build_model(layers, quant)
                model, rec = attach(model, method, args.rank, args.warmup + args.steps)
                by_layers[layers] = measure(model, rec, args.batch, args.seq, args.warmup, args.steps)
                del model, rec
                gc.collect()  # adapter layers and SRLoRA hold reference cycles
                torch.cuda.empty_cache()
            a, b = by_layers[l1], by_layers[l2]
            per_layer = (b["step_s_median"] - a["step_s_median"]) / (l2 - l1)
            per_layer_mem = (b["peak_gib"] - a["peak_gib"]) / (l2 - l1)
            row = {"quant": quant, "method": method, "layers_measured": [l1, l2],
                   "step_s": b["step_s_median"], "peak_gib": b["peak_gib"],
                   "per_layer_s": per_layer, "per_layer_gib": per_layer_mem,
                   "step_s_32_layers": a["step_s_median"] + (32 - l1) * per_layer,
                   "trainable_per_layer": (b["trainable"] - a["trainable"]) // (l2 - l1), "raw": by_layers}
            rows.append(row)
            print(f"{quant:5s} {method:22s} step {row['step_s']*1000:8.1f} ms  per-layer {per_layer*1000:7.2f} ms  "
                  f"peak {row['peak_gib']:6.2f} GiB", flush=True)
    for row in rows:
        base = next(r for r in rows if r["quant"] == row["quant"] and r["method"] == "peft_lora")
        row["step_ratio_vs_peft"] = row["step_s"] / base["step_s"]
        row["per_layer_ratio_vs_peft"] = row["per_layer_s"] / base["per_layer_s"]
        row["peak_ratio_vs_peft"] = row["peak_gib"] / base["peak_gib"]
    decode = decode_cost(args.rank)
    device = torch.cuda.get_device_name()
    header = (f"# Step time and peak memory, LLaMA-7B-shaped layers\n\n{device}, torch {torch.__version__}, "
              f"batch {args.batch} x seq {args.seq}, rank {args.rank}, gradient checkpointing on, bf16 autocast, "
              f"AdamW; medians of {args.steps} steps after {args.warmup} warm-up; {l1} and {l2} decoder layers "
              f"measured, 32 extrapolated. Ratios are to PEFT LoRA in the same run.\n\n")
    table = ["| base | method | trainable / layer | step (ms) | per layer (ms) | 32-layer step (s, extrap.) | "
             "peak (GiB) | step / PEFT | per-layer / PEFT | peak / PEFT |", "|" + "---|" * 10]
    for r in rows:
        table.append(f"| {r['quant']} | {r['method']} | {r['trainable_per_layer']:,} | {r['step_s']*1000:.1f} | "
                     f"{r['per_layer_s']*1000:.2f} | {r['step_s_32_layers']:.3f} | {r['peak_gib']:.2f} | "
                     f"{r['step_ratio_vs_peft']:.3f} | {r['per_layer_ratio_vs_peft']:.3f} | {r['peak_ratio_vs_peft']:.3f} |")
    text = header + "\n".join(table) + (f"\n\nSpectral decode, forward + backward of the 14 factors of one layer "
                                        f"(r={args.rank}, ratio 0.5, DCT): {decode['decode_fwd_bwd_ms_per_layer']:.3f} ms.\n")
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.md").write_text(text)
    (out / "step_time.json").write_text(json.dumps({"device": device, "args": vars(args), "rows": rows,
                                                   "decode": decode}, indent=2))


if __name__ == "__main__":
    main()
