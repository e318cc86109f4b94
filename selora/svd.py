"""Principal directions of a weight matrix, full or randomized, as used by PiSSA init and SRLoRA re-init."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrincipalDirections:
    """Top-k singular triplets of an (out, in) weight: W ~= U @ diag(S) @ V.T."""

    U: torch.Tensor  # (out, k)
    S: torch.Tensor  # (k,)
    V: torch.Tensor  # (in, k)

    @property
    def k(self) -> int:
        return self.S.numel()

    def to(self, device: torch.device | str) -> "PrincipalDirections":
        return PrincipalDirections(self.U.to(device), self.S.to(device), self.V.to(device))


def principal_directions(weight: torch.Tensor, k: int, method: str = "full", oversample: int = 8,
                         n_iter: int = 4, seed: int = 0) -> PrincipalDirections:
    """The k leading singular directions of ``weight`` (computed in float32; float64 stays float64).

    method="randomized" uses torch.svd_lowrank with ``oversample`` extra columns and ``n_iter`` power
    iterations (seeded, so every rank that computes it gets the same answer).
    """
    out_features, in_features = weight.shape
    if not 1 <= k <= min(out_features, in_features):
        raise ValueError(f"asked for {k} principal directions of a {out_features}x{in_features} weight; "
                         f"k must be in [1, {min(out_features, in_features)}]")
    matrix = weight if weight.dtype == torch.float64 else weight.float()
    if method == "full" or k + oversample >= min(out_features, in_features):
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return PrincipalDirections(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous())
    if method != "randomized":
        raise ValueError(f"svd method {method!r}: choose 'full' or 'randomized'")
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(matrix, q=k + oversample, niter=n_iter)
    return PrincipalDirections(U[:, :k].contiguous(), S[:k].contiguous(), V[:, :k].contiguous())
