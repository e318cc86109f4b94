"""Step time and peak memory on LLaMA-7B-shaped layers: HF PEFT LoRA (the baseline) vs selora LoRA, SeLoRA,
SRLoRA (recomposition cost amortised over the run) and SeLoRA at LoRA's parameter count, in one process on
one GPU, bf16 and 4-bit bases, gradient checkpointing on.

Random weights (nothing can be downloaded). Every configuration is built twice, with L1 and L2 decoder layers;
the difference gives the per-layer cost, from which a 32-layer step is extrapolated.

Timing is interleaved, because a lent GPU's speed drifts between minutes: all models of one base type stay
resident, and each of ``--rounds`` rounds runs ``--steps`` steps of every model in turn (a fresh shuffled order
per round). A method's ratio to PEFT LoRA is the median over rounds of (its time / PEFT's time in that round).
Peak memory is measured separately, one model on the GPU at a time (not on CPU).

    python bench/step_time.py                       # writes docs/benchmarks/step_time_<date>.{md,json}
    python bench/step_time.py --out $OUT --quick    # smaller run
    python bench/step_time.py --methods selora_lora,selora_haar,selora_fft2   # the training step per basis
    python bench/step_time.py --smoke --out /tmp/x  # CPU, tiny layers, seconds (tests/test_bench.py)
"""
from __future__ import annotations

import gc
import statistics
import time

import torch

from common import argument_parser, interleaved_rounds, median_range, pick_device, synchronize, write_results
import selora  # noqa: E402  (common puts the repository on the path)
from selora.srlora import SRLoRA  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
            max_position_embeddings=256)
# selora_selora decodes all factors of the model in one transform per factor shape per forward (the default);
# selora_selora_per_factor makes each factor decode itself. selora_<basis> (e.g. selora_haar, selora_fft2) is
# SeLoRA at ratio 0.5 with that basis of the selora.bases registry.
METHODS = ["peft_lora", "selora_lora", "selora_selora", "selora_selora_per_factor", "selora_srlora",
           "selora_selora_matched"]


def build_model(layers: int, quant: str, shape: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(num_hidden_layers=layers, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
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

    def __init__(self, quant: str, method: str, layers: int, args, total_steps: int):
        self.method, self.device = method, args.device
        self.model, self.srlora = attach(build_model(layers, quant, args.shape, args.device), method, args.rank,
                                         total_steps)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        generator = torch.Generator(device=args.device).manual_seed(0)
        self.inputs = [torch.randint(0, args.shape["vocab_size"], (args.batch, args.seq), device=args.device,
                                     generator=generator) for _ in range(4)]
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
            synchronize(self.device)
            start = time.perf_counter()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                loss = self.model(input_ids=ids, labels=ids).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.srlora is not None:
                self.srlora.step(self.step_count, self.optimizer)
            synchronize(self.device)
            times.append(time.perf_counter() - start)
        self.loss = float(loss)
        return times


def free() -> None:
    gc.collect()  # adapter layers and SRLoRA hold reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory(quant: str, method: str, layers: int, args) -> tuple[float | None, int]:
    """Steady-state peak (GiB; None on CPU) over 3 steps after 2 warm-up steps, alone on the GPU; and trainable
    count."""
    free()
    trainee = Trainee(quant, method, layers, args, 100)
    if args.device.type != "cuda":
        return None, sum(p.numel() for p in trainee.params)
    trainee.run(2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    trainee.run(3)
    result = torch.cuda.max_memory_allocated() / 2 ** 30, sum(p.numel() for p in trainee.params)
    del trainee
    free()
    return result


def interleaved_times(quant: str, layer_counts: tuple[int, int], args) -> dict:
    """{(method, layers): [per-round mean step seconds]}, all models resident, rounds interleaved."""
    total = args.warmup + args.rounds * args.steps
    trainees = {(m, n): Trainee(quant, m, n, args, total) for m in args.methods.split(",") for n in layer_counts}
    for trainee in trainees.values():
        trainee.run(args.warmup)
    # the mean over a round's steps, so that a recomposition counts
    rounds = interleaved_rounds({key: lambda t=t: statistics.fmean(t.run(args.steps)) for key, t in trainees.items()},
                                args.rounds)
    losses = {key: t.loss for key, t in trainees.items()}
    del trainees
    free()
    return rounds, losses


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argument_parser(__doc__)
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
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny layers, fp32, no 4-bit: seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.rounds, args.seq = "1,2", 2, 256
    args.device, _dtype, device = pick_device(cpu=args.smoke)
    args.shape = LLAMA_7B
    if args.smoke:
        args.shape, args.quant, args.layers, args.rank = TINY, "bf16", "1,2", 4
        args.batch, args.seq, args.warmup, args.rounds, args.steps = 2, 32, 1, 2, 5
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
            ratio, low, high = median_range(y / p for y, p in zip(b, peft[l2]))
            peak, peft_peak = memory[(method, l2)][0], memory[("peft_lora", l2)][0]
            row = {"quant": quant, "method": method, "layers_measured": [l1, l2],
                   "step_s": statistics.median(b), "per_layer_s": statistics.median(per_layer),
                   "step_s_32_layers": statistics.median(x + (32 - l1) * p for x, p in zip(a, per_layer)),
                   "step_ratio_vs_peft": ratio, "step_ratio_spread": [low, high],
                   "per_layer_ratio_vs_peft": statistics.median(per_layer) / statistics.median(peft_layer),
                   "peak_gib": peak, "peak_ratio_vs_peft": None if peak is None else peak / peft_peak,
                   "per_layer_gib": None if peak is None else (peak - memory[(method, l1)][0]) / (l2 - l1),
                   "trainable_per_layer": (memory[(method, l2)][1] - memory[(method, l1)][1]) // (l2 - l1),
                   "round_means_s": {str(l1): a, str(l2): b}, "final_loss": losses[(method, l2)]}
            rows.append(row)
            print(f"{quant:5s} {method:30s} step {row['step_s'] * 1000:7.1f} ms  x{ratio:.3f} [{low:.3f}, {high:.3f}]"
                  f"  per-layer {row['per_layer_s'] * 1000:6.2f} ms  peak {gib(peak)} GiB", flush=True)
    header = (f"# Step time and peak memory, {'tiny' if args.smoke else 'LLaMA-7B'}-shaped layers\n\n{device}, torch "
              f"{torch.__version__}, batch {args.batch} x seq {args.seq}, rank {args.rank}, gradient checkpointing on, "
              f"bf16 autocast on a GPU, AdamW. Models with {l1} and {l2} decoder layers, all resident; {args.rounds} "
              f"interleaved rounds of {args.steps} steps each after {args.warmup} warm-up steps (SRLoRA recomposes every "
              f"5 steps, once per round, with randomized SVD). Step time: mean over a round's steps; step ratio: median "
              f"over rounds of the ratio to PEFT LoRA in the same round (min-max over rounds in brackets). Peak memory: "
              f"alone on the GPU, steady state.\n\n")
    table = ["| base | method | trainable / layer | step (ms) | per layer (ms) | 32-layer step (s, extrap.) | "
             "peak (GiB) | step / PEFT [range] | per-layer / PEFT | peak / PEFT |", "|" + "---|" * 10]
    for r in rows:
        table.append(f"| {r['quant']} | {r['method']} | {r['trainable_per_layer']:,} | {r['step_s'] * 1000:.1f} | "
                     f"{r['per_layer_s'] * 1000:.2f} | {r['step_s_32_layers']:.3f} | {gib(r['peak_gib'])} | "
                     f"{r['step_ratio_vs_peft']:.3f} [{r['step_ratio_spread'][0]:.3f}-{r['step_ratio_spread'][1]:.3f}] | "
                     f"{r['per_layer_ratio_vs_peft']:.3f} | {gib(r['peak_ratio_vs_peft'], 3)} |")
    text = header + "\n".join(table) + "\n"
    print("\n" + text)
    settings = {k: v for k, v in vars(args).items() if k not in ("device", "shape", "out")}
    write_results(args.out, "step_time", text, {"args": settings, "rows": rows}, device)
    return rows


def gib(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
