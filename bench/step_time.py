"""Step time and peak memory on LLaMA-7B-shaped layers: HF PEFT LoRA (the baseline) vs selora LoRA, SeLoRA,
SRLoRA (recomposition cost amortised over the run) and SeLoRA at LoRA's parameter count, in one process on
one GPU, bf16 and 4-bit bases, gradient checkpointing on.

Random weights (nothing can be downloaded). Every configuration is built twice, with L1 and L2 decoder layers;
the difference gives the per-layer cost, from which a 32-layer step is extrapolated.

Timing is interleaved, because a lent GPU's speed drifts between minutes: all models of one base type stay
resident, and each of ``--rounds`` rounds runs ``--steps`` steps of every model in turn (a fresh shuffled order
per round). A method's ratio to PEFT LoRA is the median over rounds of (its time / PEFT's time in that round).
Peak memory is measured separately, one model on the GPU at a time.

    python bench/step_time.py                       # writes docs/benchmarks/step_time.{md,json}
    python bench/step_time.py --out $OUT --quick    # smaller run
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import selora  # noqa: E402
from selora.srlora import SRLoRA  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=4096)
# selora_selora decodes all factors of the model in one transform per factor shape per forward (the default);
# selora_selora_per_factor makes each factor decode itself. selora_<basis> (e.g. selora_haar, selora_fft2) is
# SeLoRA at ratio 0.5 with that basis of the selora.bases registry.
METHODS = ["peft_lora", "selora_lora", "selora_selora", "selora_selora_per_factor", "selora_srlora",
           "selora_selora_matched"]


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
    if method == "peft_lora":
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(selora.LLAMA_PROJECTIONS))
        return get_peft_model(model, config), None
    if method == "selora_lora":
        return selora.apply(model, selora.LoRAConfig(r=rank, alpha=2 * rank)), None
    if method in ("selora_selora", "selora_selora_per_factor"):
        return selora.apply(model, selora.SeLoRAConfig(r=rank, alpha=2 * rank, spectral_ratio=0.5)), None
    if method == "selora_selora_matched":  # r doubled at ratio 0.5: the same trainable count as LoRA at r
        return selora.apply(model, selora.SeLoRAConfig(r=2 * rank, alpha=4 * rank, spectral_ratio=0.5)), None
    if method.startswith("selora_") and method[len("selora_"):] in selora.bases.names():
        config = selora.SeLoRAConfig(r=rank, alpha=2 * rank, spectral_ratio=0.5, basis=method[len("selora_"):])
        return selora.apply(model, config), None
    if method == "selora_srlora":
        selora.apply(model, selora.LoRAConfig(r=rank, alpha=2 * rank))
        srlora = selora.SRLoRAConfig(start_step=5, end_step=total_steps, interval=5, svd="randomized")
        return model, SRLoRA(model, srlora, total_steps=total_steps)
    raise ValueError(method)


class Trainee:
    """One model + optimizer (+ SRLoRA), stepped a few steps at a time."""

    def __init__(self, quant: str, method: str, layers: int, rank: int, batch: int, seq: int, total_steps: int):
        self.method = method
        self.model, self.srlora = attach(build_model(layers, quant), method, rank, total_steps)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        generator = torch.Generator(device="cuda").manual_seed(0)
        self.inputs = [torch.randint(0, LLAMA_7B["vocab_size"], (batch, seq), device="cuda", generator=generator)
                       for _ in range(4)]
        self.step_count, self.loss = 0, None

    def run(self, steps: int) -> list[float]:
        """Seconds per step (host wall time around a synchronized step)."""
        decoder = getattr(self.model, "selora_decoder", None)
        if decoder is not None:
            decoder.batched = not self.method.endswith("_per_factor")
        times = []
        for _ in range(steps):
            self.step_count += 1
            ids = self.inputs[self.step_count % len(self.inputs)]
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = self.model(input_ids=ids, labels=ids).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.srlora is not None:
                self.srlora.step(self.step_count, self.optimizer)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        self.loss = float(loss)
        return times


def free() -> None:
    gc.collect()  # adapter layers and SRLoRA hold reference cycles
    torch.cuda.empty_cache()


def peak_memory(quant: str, method: str, layers: int, args) -> tuple[float, int]:
    """Steady-state peak (GiB) over 3 steps after 2 warm-up steps, alone on the GPU; and trainable count."""
    free()
    trainee = Trainee(quant, method, layers, args.rank, args.batch, args.seq, 100)
    trainee.run(2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    trainee.run(3)
    result = torch.cuda.max_memory_allocated() / 2 ** 30, sum(p.numel() for p in trainee.params)
    del trainee
    free()
    return result


def interleaved_times(quant: str, layer_counts: tuple[int, int], args) -> dict:
    """{(method, layers): [per-round median step seconds]}, all models resident, rounds interleaved."""
    total = args.warmup + args.rounds * args.steps
    trainees = {(m, n): Trainee(quant, m, n, args.rank, args.batch, args.seq, total)
                for m in args.methods.split(",") for n in layer_counts}
    for trainee in trainees.values():
        trainee.run(args.warmup)
    order, rounds = list(trainees), {key: [] for key in trainees}
    shuffle = random.Random(0)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for key in order:
            rounds[key].append(statistics.fmean(trainees[key].run(args.steps)))  # mean: recompositions count
    losses = {key: t.loss for key, t in trainees.items()}
    del trainees
    free()
    return rounds, losses


def decode_cost(rank: int, repeats: int = 50, basis: str = "haar") -> dict:
    """Time to decode (forward + backward) all 14 factors of one LLaMA-7B layer, standalone (host-bound)."""
    from selora.decode import IndexSet, SpectralDecode
    shapes = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    factors = []
    for in_f, out_f in shapes:
        for length in (in_f, out_f):
            index_set = IndexSet.draw(basis, rank, length, selora.bases.get(basis).count(rank, length, 0.5), seed=0)
            entries = torch.randn(index_set.count, device="cuda", requires_grad=True)
            factors.append((entries, index_set.on(torch.device("cuda")), length))

    def run():
        decoder = selora.bases.get(basis)
        total = sum(SpectralDecode.apply(c, idx, decoder, rank, n).sum() for c, idx, n in factors)
        total.backward()
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    torch.cuda.synchronize()
    return {"decode_fwd_bwd_ms_per_layer": 1000 * (time.perf_counter() - start) / repeats, "basis": basis}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--layers", default="2,6")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps per model per round (SRLoRA recomposes every "
                        "5 steps here, so each round holds exactly one recomposition: the round mean amortises it)")
    parser.add_argument("--quant", default="bf16,4bit")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.rounds, args.seq = "1,2", 2, 256
    l1, l2 = (int(x) for x in args.layers.split(","))
    methods = args.methods.split(",")
    rows = []
    for quant in args.quant.split(","):
        memory = {(m, n): peak_memory(quant, m, n, args) for m in methods for n in (l1, l2)}
        rounds, losses = interleaved_times(quant, (l1, l2), args)
        peft = {n: rounds[("peft_lora", n)] for n in (l1, l2)}
        for method in methods:
            a, b = rounds[(method, l1)], rounds[(method, l2)]
            per_layer = [(y - x) / (l2 - l1) for x, y in zip(a, b)]
            peft_layer = [(y - x) / (l2 - l1) for x, y in zip(peft[l1], peft[l2])]
            row = {"quant": quant, "method": method, "layers_measured": [l1, l2],
                   "step_s": statistics.median(b), "per_layer_s": statistics.median(per_layer),
                   "step_s_32_layers": statistics.median(x + (32 - l1) * p for x, p in zip(a, per_layer)),
                   "step_ratio_vs_peft": statistics.median(y / p for y, p in zip(b, peft[l2])),
                   "step_ratio_spread": [min(y / p for y, p in zip(b, peft[l2])), max(y / p for y, p in zip(b, peft[l2]))],
                   "per_layer_ratio_vs_peft": statistics.median(per_layer) / statistics.median(peft_layer),
                   "peak_gib": memory[(method, l2)][0],
                   "peak_ratio_vs_peft": memory[(method, l2)][0] / memory[("peft_lora", l2)][0],
                   "per_layer_gib": (memory[(method, l2)][0] - memory[(method, l1)][0]) / (l2 - l1),
                   "trainable_per_layer": (memory[(method, l2)][1] - memory[(method, l1)][1]) // (l2 - l1),
                   "round_means_s": {str(l1): a, str(l2): b}, "final_loss": losses[(method, l2)]}
            rows.append(row)
            print(f"{quant:5s} {method:30s} step {row['step_s'] * 1000:7.1f} ms  x{row['step_ratio_vs_peft']:.3f} "
                  f"[{row['step_ratio_spread'][0]:.3f}, {row['step_ratio_spread'][1]:.3f}]  per-layer "
                  f"{row['per_layer_s'] * 1000:6.2f} ms  peak {row['peak_gib']:6.2f} GiB x{row['peak_ratio_vs_peft']:.3f}",
                  flush=True)
    decode = decode_cost(args.rank)
    device = torch.cuda.get_device_name()
    header = (f"# Step time and peak memory, LLaMA-7B-shaped layers\n\n{device}, torch {torch.__version__}, "
              f"batch {args.batch} x seq {args.seq}, rank {args.rank}, gradient checkpointing on, bf16 autocast, "
              f"AdamW. Models with {l1} and {l2} decoder layers, all resident; {args.rounds} interleaved rounds of "
              f"{args.steps} steps each after {args.warmup} warm-up steps (SRLoRA recomposes every 5 steps, once per "
              f"round, with randomized SVD). Step time: mean over a round's steps; step ratio: median over rounds of the "
              f"ratio to PEFT LoRA in the same round (min-max over rounds in brackets). Peak memory: alone on the GPU, "
              f"steady state.\n\n")
    table = ["| base | method | trainable / layer | step (ms) | per layer (ms) | 32-layer step (s, extrap.) | "
             "peak (GiB) | step / PEFT [range] | per-layer / PEFT | peak / PEFT |", "|" + "---|" * 10]
    for r in rows:
        table.append(f"| {r['quant']} | {r['method']} | {r['trainable_per_layer']:,} | {r['step_s'] * 1000:.1f} | "
                     f"{r['per_layer_s'] * 1000:.2f} | {r['step_s_32_layers']:.3f} | {r['peak_gib']:.2f} | "
                     f"{r['step_ratio_vs_peft']:.3f} [{r['step_ratio_spread'][0]:.3f}-{r['step_ratio_spread'][1]:.3f}] | "
                     f"{r['per_layer_ratio_vs_peft']:.3f} | {r['peak_ratio_vs_peft']:.3f} |")
    text = header + "\n".join(table) + (f"\n\nSpectral decode, forward + backward of the 14 factors of one layer "
                                        f"(r={args.rank}, ratio 0.5, {decode['basis']}), standalone: "
                                        f"{decode['decode_fwd_bwd_ms_per_layer']:.3f} ms.\n")
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.md").write_text(text)
    (out / "step_time.json").write_text(json.dumps({"device": device, "args": vars(args), "rows": rows,
                                                   "decode": decode}, indent=2))


if __name__ == "__main__":
    main()
