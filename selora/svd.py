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


def svd_cost(out_features: int, in_features: int, k: int, method: str) -> float:
    """Rough flop count, used only to balance SVD work across ranks."""
    if method == "full":
        return float(out_features) * in_features * min(out_features, in_features)
    return float(out_features) * in_features * (k + 8) * 6


def sharded_principal_directions(layers: dict, counts: dict[str, int], method: str = "full",
                                 seed: int = 0, oversample: int = 8) -> tuple[dict[str, PrincipalDirections], dict]:
    """Principal directions of many layers' pretrained weights, the work spread over ranks.

    layers: name -> adapter layer (it has out_features, in_features and ``pretrained_weight_on(owner)``, which
    returns the (out, in) weight on ``owner`` and None elsewhere; it may be a collective, gathering a ZeRO-3
    shard to the owner only, so every rank calls it).
    Layers go to owners by cost (largest first, to the least loaded rank) and are processed in rounds of at
    most one layer per rank, so all ranks run their SVDs at the same time; each result is then broadcast,
    because every rank needs the directions to update its own shard.

    ``oversample``: extra columns of the randomized SVD (method="randomized"; see `principal_directions`).
    Returns (directions by name on every rank, {"computed_here": n, "owners": {name: rank}}).
    """
    from .distributed import assign_owners, broadcast_tensors, world

    rank, world_size = world()
    names = list(layers)
    costs = [svd_cost(layers[n].out_features, layers[n].in_features, counts[n], method) for n in names]
    owners = dict(zip(names, assign_owners(costs, world_size)))
    queues = [[n for n in names if owners[n] == r] for r in range(world_size)]
    results: dict[str, PrincipalDirections] = {}
    computed = 0
    for round_index in range(max(len(q) for q in queues)):
        batch = [q[round_index] for q in queues if round_index < len(q)]
        local = {}
        for name in batch:  # every rank takes part in every gather of the round
            full = layers[name].pretrained_weight_on(owners[name])
            if full is not None:
                local[name] = full
        for name, full in local.items():
            local[name] = principal_directions(full, counts[name], method=method, oversample=oversample, seed=seed)
            computed += 1
        for name in batch:
            out_features, in_features, k = layers[name].out_features, layers[name].in_features, counts[name]
            found = local.get(name)
            device = found.U.device if found is not None else layers[name].base_delta_A.device
            U = found.U.contiguous() if found is not None else torch.empty(out_features, k, device=device)
            S = found.S.contiguous() if found is not None else torch.empty(k, device=device)
            V = found.V.contiguous() if found is not None else torch.empty(in_features, k, device=device)
            broadcast_tensors([U, S, V], src=owners[name])
            results[name] = PrincipalDirections(U, S, V)
    return results, {"computed_here": computed, "owners": owners}

