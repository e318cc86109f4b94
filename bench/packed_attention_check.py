"""Checks recipes/packed_attention.py's GPU kernel (aten's varlen flash attention, called directly) and torch's
public wrapper of the same kernels (``torch.nn.attention.varlen``) against the per-example SDPA reference on one
flat row of examples, forward and backward, and times them beside SDPA with the block mask that transformers
builds for the same row and beside causal SDPA on the same examples padded to rows (what a padded loop pays).
Times are CUDA-event medians of a whole forward+backward call, launch gaps included (the step is host-bound).
Run on the GPU machine before the padding-free bench rows:

    python bench/packed_attention_check.py            # bf16, 16 heads of 128 (the 1.3B bench shape; 4 kv heads to try GQA), 8 examples
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_selora import event_time_ms  # noqa: E402
from recipes.packed_attention import flash_varlen, per_example_sdpa, repeat_kv  # noqa: E402


def torch_varlen(q, k, v, cu_seq_lens, max_length: int, scale: float) -> torch.Tensor:
    """The recipe's varlen attention through torch's public wrapper, ``torch.nn.attention.varlen.varlen_attn``
    (what the recipe called before it called the kernels directly). Its arguments differ between torch releases
    (``is_causal`` up to 2.12, ``window_size`` after): read from its signature."""
    from torch.nn.attention.varlen import varlen_attn
    parameters = inspect.signature(varlen_attn).parameters
    kwargs = {"scale": scale} if "scale" in parameters else {}
    kwargs.update({"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)})
    k, v = repeat_kv(q, k, v)
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_length, max_length, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--lengths", default="250,231,204,188,170,151,133,120")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    lengths = [int(n) for n in args.lengths.split(",")]
    total = sum(lengths)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def leaf(heads):
        return torch.randn(total, heads, args.dim, device=device, dtype=dtype, generator=generator).requires_grad_()
    q, k, v = leaf(args.heads), leaf(args.kv_heads), leaf(args.kv_heads)
    grad = torch.randn(total, args.heads, args.dim, device=device, dtype=dtype, generator=generator)
    scale = args.dim ** -0.5

    def forward_backward(kernel):
        for t in (q, k, v):
            t.grad = None
        out = kernel(q, k, v, bounds, max(lengths), scale)
        out.backward(grad)
        return out.detach().float(), [t.grad.float() for t in (q, k, v)]

    reference, reference_grads = forward_backward(per_example_sdpa)
    for name, kernel in (("recipe varlen", flash_varlen), ("torch varlen_attn", torch_varlen)):
        out, grads = forward_backward(kernel)
        errors = [((a - b).norm() / b.norm()).item() for a, b in zip([out, *grads], [reference, *reference_grads])]
        print(f"relative error of {name} vs per-example SDPA (out, dq, dk, dv): " + ", ".join(f"{e:.2e}" for e in errors))
        assert max(errors) < 2e-2, f"{name} disagrees with the reference"

    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    mask = (segment[:, None] == segment[None, :]) & torch.ones(total, total, dtype=torch.bool, device=device).tril()

    def masked_sdpa(q, k, v, *_):
        groups = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask,
                                              scale=scale)[0].transpose(0, 1)
    width = max(lengths)
    padded = [torch.randn(len(lengths), heads, width, args.dim, device=device, dtype=dtype, generator=generator)
              .requires_grad_() for heads in (args.heads, args.heads, args.heads)]
    padded_grad = torch.randn_like(padded[0])

    def causal_padded_rows():  # the examples as padded rows, one causal SDPA call (the flash path, no mask)
        for t in padded:
            t.grad = None
        F.scaled_dot_product_attention(*padded, is_causal=True, scale=scale).backward(padded_grad)

    def only(kernel):  # forward + backward alone, no float copies of the results
        def run():
            for t in (q, k, v):
                t.grad = None
            kernel(q, k, v, bounds, max(lengths), scale).backward(grad)
        return run
    timings = [("recipe varlen (aten flash, direct)", only(flash_varlen)),
               ("torch varlen_attn (custom op)", only(torch_varlen)),
               ("SDPA + block mask", only(masked_sdpa)), ("SDPA per example", only(per_example_sdpa)),
               (f"causal SDPA, {len(lengths)} padded rows of {width}", causal_padded_rows)]
    for name, run in timings:
        print(f"{name:>40}: {event_time_ms(run):.3f} ms forward+backward, one layer, {total} tokens in "
              f"{len(lengths)} examples")


if __name__ == "__main__":
    main()
