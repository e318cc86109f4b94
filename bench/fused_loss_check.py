"""A GPU check of model.fused_loss (recipes/fused_loss.py): liger-kernel's fused output layer + cross-entropy against
logits + torch's cross-entropy at a LLaMA-3 output layer (128k vocabulary, h 4096, 4 x 2048 tokens, bf16), with
ignored labels and the loss summed over the step's learned tokens: the loss, the hidden states' gradient and the
peak memory of each.

    python bench/fused_loss_check.py        # GPU only (liger-kernel needs triton); prints one line

2026-12-06, one H100: loss 12.588391 both, gradient max difference 1.2e-7, peak 1.2 GiB fused vs 16.8 GiB.
"""
import torch
import torch.nn.functional as F

from common import ROOT  # noqa: F401 - puts the project on sys.path
from recipes.fused_loss import liger_loss

VOCAB, HIDDEN, BATCH, SEQ = 128256, 4096, 4, 2048


def logits_loss(hidden, weight, labels, count):
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum") / count


def measured(loss_fn, hidden, weight, labels, count):
    """(loss, gradient of hidden, peak GiB of the forward and backward)."""
    hidden.grad = None
    torch.cuda.reset_peak_memory_stats()
    loss = loss_fn(hidden, weight, labels, count)
    loss.backward()
    return loss.item(), hidden.grad.clone(), torch.cuda.max_memory_allocated() / 2**30


def main():
    torch.manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
    labels[:, :100] = -100  # prompt tokens
    count = (labels[:, 1:] != -100).sum()
    fused, fused_grad, fused_peak = measured(liger_loss, hidden, weight, labels, count)
    plain, plain_grad, plain_peak = measured(logits_loss, hidden, weight, labels, count)
    print(f"loss fused {fused:.6f} logits {plain:.6f}; gradient max difference "
          f"{(fused_grad - plain_grad).abs().max().item():.2e}; peak GiB fused {fused_peak:.1f} logits {plain_peak:.1f}")


if __name__ == "__main__":
    main()
