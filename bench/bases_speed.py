"""How fast do SeLoRA's bases decode? Decode + adjoint (forward + backward) of every basis and implementation
candidate on LLaMA-7B factor shapes, on one GPU. (The whole recipe's step per method: bench/recipe_vs_peft.py.)

Candidates for the 2-D inverse DWT (all exact linear maps; the table gives their max difference to selora's):
  selora        selora.bases (polyphase along the width, a small dense matrix along the rank; no conv kernels)
  dense-matmul  precomputed synthesis matrices, S_r @ F @ S_d^T (two matmuls; S_d is d x d, 0.8 GB at 14336)
  ptwt          the PyTorch wavelet toolbox's waverec2 (only if installed; its boundary modes pad instead of
                periodizing, so only its speed is comparable)

    python bench/bases_speed.py                          # GPU, ~3 min; docs/benchmarks/bases_speed_<date>.{md,json}
    python bench/bases_speed.py --smoke --out /tmp/bases # CPU, tiny shapes, seconds (tests/test_bench.py)
"""
from __future__ import annotations

import gc

import torch

from common import argument_parser, pick_device, time_ms, write_results
import selora  # noqa: E402  (common puts the repository on the path)
from selora.decode import IndexSet, SpectralDecode  # noqa: E402

BASES = ("haar", "db4", "bior2.2", "coif1", "fft2", "dct_rows")


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
                        ms = time_ms(run, device, args.repeats, warmup=1 if args.smoke else 3)
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


def write(args, name: str, decode_rows: list[dict]) -> str:
    lines = ["# SeLoRA bases: decode speed\n",
             f"{name}, torch {torch.__version__}; `python bench/bases_speed.py{' --smoke' if args.smoke else ''}`.\n"]
    lines += ["## Decode + adjoint (forward + backward) per factor shape, spectral ratio 0.5\n",
              f"Median of {args.repeats} runs (CUDA events on a GPU); `factors` = how many factors of the shape are decoded in one "
              "batched call (the model-wide decode stacks a shape's factors; a LLaMA-7B has 32-160 per shape). "
              "`diff` = max |output - selora haar| (an exactness check of the other Haar implementations).\n",
              "| r | width | factors | candidate | fwd+bwd (ms) | diff |", "|---|---|---|---|---|---|"]
    for row in decode_rows:
        value = f"{row['fwd_bwd_ms']:.3f}" if "fwd_bwd_ms" in row else row["error"]
        diff = f"{row['max_diff_vs_selora_haar']:.1e}" if "max_diff_vs_selora_haar" in row else ""
        lines.append(f"| {row['rank']} | {row['width']} | {row['factors']} | {row['candidate']} | {value} | {diff} |")
    text = "\n".join(lines) + "\n"
    write_results(args.out, "bases_speed", text,
                  {"args": {k: v for k, v in vars(args).items() if k != "out"}, "decode": decode_rows}, name)
    return text


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argument_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    device, _dtype, name = pick_device(cpu=args.smoke)
    args.ranks, args.widths, args.stacked = (8, 16, 32, 64), (4096, 11008, 14336), 32
    if args.smoke:
        args.ranks, args.widths, args.stacked, args.repeats = (4, 8), (64, 96), 4, 1
    rows = decode_table(args, device)
    print("\n" + write(args, name, rows))
    return rows


if __name__ == "__main__":
    main()
