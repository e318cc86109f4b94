"""SeLoRA's bases on one GPU: (1) decode + adjoint (forward + backward) of every basis and implementation candidate
on LLaMA-7B factor shapes; (2) the training step of SeLoRA_W (haar) and SeLoRA_F (fft2) against selora's LoRA at
LLaMA-7B shape, r = 32, batch 4 x 1024, in one process (interleaved rounds), with peak memory.

Candidates for the 2-D inverse DWT (all exact linear maps; the table gives their max difference to selora's):
  selora        selora.bases (polyphase along the width, a small dense matrix along the rank; no conv kernels)
  dense-matmul  precomputed synthesis matrices, S_r @ F @ S_d^T (two matmuls; S_d is d x d, 0.8 GB at 14336)
  ptwt          the PyTorch wavelet toolbox's waverec2 (only if installed; its boundary modes pad instead of
                periodizing, so only its speed is comparable)

    source .whl/install.sh || exit 1; python bench/bases_speed.py                # GPU, ~5 min; docs/benchmarks/
    python bench/bases_speed.py --smoke --out /tmp/bases                         # CPU, tiny shapes, ~1 min
    python bench/bases_speed.py --skip-decode --full-depth                      # GPU, whole 32-layer models, ~3 min;
                                                                                # docs/benchmarks/bases_speed_full_depth.*
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
from selora.decode import IndexSet, SpectralDecode  # noqa: E402

BASES = ("haar", "db4", "bior2.2", "coif1", "fft2", "dct_rows")
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
            max_position_embeddings=256)
STEP_METHODS = ("lora", "haar", "fft2")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


# ----- (1) decode + adjoint per factor shape ----------------------------------------------------------------
def candidates(rows: int, length: int, device: torch.device, stacked: int):
    """name -> (forward+backward closure, decoded output for the exactness check)."""
    out = {}
    generator = torch.Generator(device=device).manual_seed(0)
    haar_inputs = None
    for name in BASES:
        basis = selora.bases.get(name)
        index_set = IndexSet.draw(name, rows, length, basis.count(rows, length, 0.5), seed=0)
        indices = index_set.on(device)
        entries = torch.randn(stacked, index_set.count, device=device, generator=generator).requires_grad_(True)
        grad = torch.randn(stacked, rows, length, device=device, generator=generator)
        if name == "haar":  # the other Haar candidates decode the same entries: their outputs must agree
            haar_inputs = (entries, grad)

        def run(entries=entries, indices=indices, basis=basis, grad=grad):
            dense = SpectralDecode.apply(entries, indices, basis, rows, length)
            dense.backward(grad)
            return dense
        out[f"selora {name}"] = run
    # dense-matmul Haar: the same map as two matmuls with precomputed synthesis matrices
    haar = selora.bases.get("haar")
    index_set = IndexSet.draw("haar", rows, length, haar.count(rows, length, 0.5), seed=0)
    indices = index_set.on(device)
    try:
        eye = torch.eye(length, device=device)
        width = haar._synthesize_last(eye).T.contiguous()  # (length, length): column k = signal of coefficient k
        del eye
        height = haar.row_matrix(rows, device, torch.float32)
        entries, grad = haar_inputs

        def dense_run():
            spectrum = haar.scatter(entries, indices, rows, length)
            dense = height @ spectrum @ width.T
            dense.backward(grad)
            return dense
        out["dense-matmul haar"] = dense_run
    except torch.OutOfMemoryError:
        pass
    try:
        import ptwt
        import pywt
        entries, grad = haar_inputs

        def ptwt_run():
            spectrum = haar.scatter(entries, indices, rows, length)
            h, w = rows // 2, length // 2
            coefficients = (spectrum[..., :h, :w], (spectrum[..., h:, :w], spectrum[..., :h, w:], spectrum[..., h:, w:]))
            dense = ptwt.waverec2(coefficients, pywt.Wavelet("haar"))
            dense.backward(grad)
            return dense
        out["ptwt haar"] = ptwt_run
    except ImportError:
        pass
    return out


def decode_table(args, device: torch.device) -> list[dict]:
    rows_out = []
    for rank in args.ranks:
        for length in args.widths:
            reference = None
            for stacked in (1, args.stacked):
                runs = candidates(rank, length, device, stacked)
                for name, run in runs.items():
                    try:
                        ms = median_ms(run, device, args.repeats)
                        output = run().detach()
                    except Exception as error:  # a candidate that cannot run this shape is reported, not fatal
                        rows_out.append({"rank": rank, "width": length, "factors": stacked, "candidate": name,
                                         "error": f"{type(error).__name__}: {error}"[:160]})
                        continue
                    row = {"rank": rank, "width": length, "factors": stacked, "candidate": name, "fwd_bwd_ms": ms}
                    if name == "selora haar":
                        reference = output
                    elif name.endswith("haar") and reference is not None and output.shape == reference.shape:
                        row["max_diff_vs_selora_haar"] = (output - reference).abs().max().item()
                    rows_out.append(row)
                    print(f"r={rank:3d} d={length:6d} x{stacked:3d}  {name:20s} {ms:8.3f} ms"
                          + (f"  diff {row['max_diff_vs_selora_haar']:.2e}" if "max_diff_vs_selora_haar" in row else ""),
                          flush=True)
                del runs
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows_out


# ----- (2) training step, SeLoRA_W / SeLoRA_F vs LoRA --------------------------------------------------------
def build(method: str, layers: int, args, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = TINY if args.smoke else LLAMA_7B
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    if device.type == "cuda":  # born in bf16: three resident 32-layer models fit (13.5 GB each), fp32 ones would not
        torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **shape))
    finally:
        torch.set_default_dtype(default_dtype)
    selora.enable_gradient_checkpointing(model)  # as recipes/modeling.load_model does
    model.config.use_cache = False
    targets = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the paper's setting
    common = dict(r=args.rank, alpha=2 * args.rank, target_modules=targets)
    config = selora.LoRAConfig(**common) if method == "lora" else \
        selora.SeLoRAConfig(**common, basis=method, spectral_ratio=0.5)
    selora.apply(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator(device=device).manual_seed(0)
    ids = [torch.randint(0, shape["vocab_size"], (args.batch, args.seq), device=device, generator=generator)
           for _ in range(2)]
    return {"model": model, "optimizer": optimizer, "ids": ids, "steps": 0,
            "trainable": sum(p.numel() for p in params)}


def train_steps(trainee: dict, steps: int, device: torch.device) -> float:
    """Mean seconds per optimizer step (synchronized)."""
    model, optimizer = trainee["model"], trainee["optimizer"]
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainee["steps"] += 1
        ids = trainee["ids"][trainee["steps"] % 2]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def interleaved_rounds(trainees: dict, args, device: torch.device) -> dict[object, list[float]]:
    """Seconds per step of every trainee in each of ``args.rounds`` rounds (after ``args.warmup`` steps each); a
    round visits them in a fresh shuffled order, so drift of the machine hits every trainee alike."""
    for trainee in trainees.values():
        train_steps(trainee, args.warmup, device)
    rounds = {key: [] for key in trainees}
    order, shuffle = list(trainees), random.Random(0)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for key in order:
            rounds[key].append(train_steps(trainees[key], args.steps, device))
    return rounds


def step_table(args, device: torch.device) -> list[dict]:
    l1, l2 = args.layers
    memory = {}
    if device.type == "cuda":  # peak memory alone on the GPU, steady state
        for method in STEP_METHODS:
            gc.collect()
            torch.cuda.empty_cache()
            trainee = build(method, l2, args, device)
            train_steps(trainee, 2, device)
            torch.cuda.reset_peak_memory_stats()
            train_steps(trainee, 3, device)
            memory[method] = torch.cuda.max_memory_allocated() / 2 ** 30
            del trainee
    gc.collect()
    if args.full_depth:
        return full_depth_rows(args, device, memory)
    trainees = {(m, n): build(m, n, args, device) for m in STEP_METHODS for n in (l1, l2)}
    rounds = interleaved_rounds(trainees, args, device)
    rows = []
    for method in STEP_METHODS:
        a, b = rounds[(method, l1)], rounds[(method, l2)]
        base_a, base_b = rounds[("lora", l1)], rounds[("lora", l2)]
        # 32-layer step, extrapolated from the two depths (per-layer cost = difference / layer difference)
        full = [x + (32 - l1) * (y - x) / (l2 - l1) for x, y in zip(a, b)]
        base_full = [x + (32 - l1) * (y - x) / (l2 - l1) for x, y in zip(base_a, base_b)]
        ratios = [f / g for f, g in zip(full, base_full)]
        row = {"method": method, "trainable_per_layer": (trainees[(method, l2)]["trainable"]
                                                         - trainees[(method, l1)]["trainable"]) // (l2 - l1),
               "step_s": statistics.median(b), "step_ratio_vs_lora": statistics.median(y / z for y, z in zip(b, base_b)),
               "step_s_32_layers": statistics.median(full), "step_ratio_32_layers_vs_lora": statistics.median(ratios),
               "ratio_range_32_layers": [min(ratios), max(ratios)]}
        if memory:
            row.update(peak_gib=memory[method], peak_ratio_vs_lora=memory[method] / memory["lora"])
        rows.append(row)
        print(f"{method:6s} step {row['step_s'] * 1000:8.1f} ms x{row['step_ratio_vs_lora']:.3f}  32-layer "
              f"{row['step_s_32_layers']:.3f} s x{row['step_ratio_32_layers_vs_lora']:.3f}"
              + (f"  peak {row['peak_gib']:.2f} GiB x{row['peak_ratio_vs_lora']:.4f}" if memory else ""), flush=True)
    return rows


def full_depth_rows(args, device: torch.device, memory: dict) -> list[dict]:
    """The step of whole 32-layer models, all three resident, measured directly (no extrapolation): interleaved
    rounds, the ratio to LoRA's step in the same round."""
    trainees = {m: build(m, 32, args, device) for m in STEP_METHODS}
    rounds = interleaved_rounds(trainees, args, device)
    rows = []
    for method in STEP_METHODS:
        ratios = [a / b for a, b in zip(rounds[method], rounds["lora"])]
        row = {"method": method, "trainable_per_layer": trainees[method]["trainable"] // 32,
               "step_s": statistics.median(rounds[method]), "step_ratio_vs_lora": statistics.median(ratios),
               "step_s_32_layers": statistics.median(rounds[method]), "step_ratio_32_layers_vs_lora": statistics.median(ratios),
               "ratio_range_32_layers": [min(ratios), max(ratios)], "measured_at_32_layers": True}
        if memory:
            row.update(peak_gib=memory[method], peak_ratio_vs_lora=memory[method] / memory["lora"])
        rows.append(row)
        print(f"{method:6s} 32-layer step {row['step_s']:.3f} s x{row['step_ratio_vs_lora']:.3f} "
              f"[{min(ratios):.3f}-{max(ratios):.3f}]", flush=True)
    return rows


def write(args, device: torch.device, decode_rows: list[dict], step_rows: list[dict]) -> str:
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    flags = "".join(flag for flag, on in ((" --smoke", args.smoke), (" --skip-decode", args.skip_decode),
                                          (" --skip-step", args.skip_step), (" --full-depth", args.full_depth)) if on)
    lines = ["# SeLoRA bases: decode speed and training step\n",
             f"{name}, torch {torch.__version__}; `python bench/bases_speed.py{flags}`.\n"]
    if decode_rows:
        lines += ["## Decode + adjoint (forward + backward) per factor shape, spectral ratio 0.5\n",
                  f"Median of {args.repeats} synchronized runs; `factors` = how many factors of the shape are decoded in one "
                  "batched call (the model-wide decode stacks a shape's factors; a LLaMA-7B has 32-160 per shape). "
                  "`diff` = max |output - selora haar| (an exactness check of the other Haar implementations).\n",
                  "| r | width | factors | candidate | fwd+bwd (ms) | diff |", "|---|---|---|---|---|---|"]
    for row in decode_rows:
        value = f"{row['fwd_bwd_ms']:.3f}" if "fwd_bwd_ms" in row else row["error"]
        diff = f"{row['max_diff_vs_selora_haar']:.1e}" if "max_diff_vs_selora_haar" in row else ""
        lines.append(f"| {row['rank']} | {row['width']} | {row['factors']} | {row['candidate']} | {value} | {diff} |")
    l1, l2 = args.layers
    lines += ["", "## Training step: SeLoRA_W (haar) and SeLoRA_F (fft2) vs selora LoRA\n",
              f"{'LLaMA-7B' if not args.smoke else 'tiny'}-shaped models with "
              f"{'32' if args.full_depth else f'{l1} and {l2}'} decoder layers, all resident; "
              f"r={args.rank}, alpha={2 * args.rank}, targets q,k,v,up,down (the paper's setting), spectral ratio 0.5, "
              f"batch {args.batch} x {args.seq}, gradient checkpointing, bf16 autocast, AdamW; {args.rounds} interleaved "
              f"rounds of {args.steps} steps after {args.warmup} warm-up steps. Ratios: median over rounds of the ratio to "
              "LoRA in the same round; 32-layer: " + ("measured on whole 32-layer models, all resident (`--full-depth`; the "
              "two step columns are then the same)" if args.full_depth else "extrapolated from the two depths") +
              ". Peak memory: alone on the GPU, "
              f"{l2} layers.\n",
              "| method | trainable / layer | step (ms) | step / LoRA | 32-layer step (s) | 32-layer / LoRA [range] | "
              "peak (GiB) | peak / LoRA |", "|---|---|---|---|---|---|---|---|"]
    for row in step_rows:
        peak = (f"{row['peak_gib']:.2f} | {row['peak_ratio_vs_lora']:.4f}" if "peak_gib" in row else "n/a | n/a")
        lines.append(f"| {row['method']} | {row['trainable_per_layer']:,} | {row['step_s'] * 1000:.1f} | "
                     f"{row['step_ratio_vs_lora']:.3f} | {row['step_s_32_layers']:.3f} | "
                     f"{row['step_ratio_32_layers_vs_lora']:.3f} [{row['ratio_range_32_layers'][0]:.3f}-"
                     f"{row['ratio_range_32_layers'][1]:.3f}] | {peak} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bases_speed_full_depth" if args.full_depth else "bases_speed"  # the two tables live side by side
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"device": name, "args": vars(args), "decode": decode_rows,
                                                      "step": step_rows}, indent=2))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU in about a minute")
    parser.add_argument("--skip-step", action="store_true", help="only the decode table")
    parser.add_argument("--skip-decode", action="store_true", help="only the training step table")
    parser.add_argument("--full-depth", action="store_true",
                        help="time whole 32-layer models (about 45 GB of GPU memory) instead of extrapolating")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.ranks, args.widths, args.stacked, args.layers = (8, 16, 32, 64), (4096, 11008, 14336), 32, (2, 6)
    if args.smoke:
        args.ranks, args.widths, args.stacked, args.layers = (4, 8), (64, 96), 4, (1, 2)
        args.rank, args.batch, args.seq, args.rounds, args.steps, args.repeats = 4, 2, 32, 2, 2, 3
    decode_rows = [] if args.skip_decode else decode_table(args, device)
    step_rows = [] if args.skip_step else step_table(args, device)
    print("\n" + write(args, device, decode_rows, step_rows))


if __name__ == "__main__":
    main()
