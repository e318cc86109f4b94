"""Which records of each training source a run uses: per-source caps and proportional mixing, seeded.

A source's ``max_records`` keeps a seeded choice of at most that many of its records. ``weight``s (on every source
or none) make a mix: each record of the mix is drawn from source i with probability weight_i / sum(weights)
(one multinomial draw, so the counts are what sampling by proportion gives, within its error), then that many
distinct records are taken from the source (a source asked for more than it has is repeated, whole passes first).
The mix holds ``data.mix_records`` records, or by default as many as keeps every source's expected share within
what it has (the mix stops where the first source would run out).
"""
from __future__ import annotations

import numpy as np


def choose_records(sizes: list[int], weights: list[float | None], caps: list[int | None], total: int | None,
                   seed: int) -> list[np.ndarray] | None:
    """Row indices to keep of each source (sorted), or None when every record of every source is kept as is."""
    if all(w is None for w in weights) and all(c is None for c in caps):
        return None
    rng = np.random.default_rng(seed)
    pools = [np.sort(rng.permutation(n)[:cap]) if cap is not None and cap < n else np.arange(n)
             for n, cap in zip(sizes, caps)]
    if all(w is None for w in weights):
        return pools
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    if total is None:
        total = int(min(len(pool) / share for pool, share in zip(pools, shares)))
    counts = rng.multinomial(total, shares)
    chosen = []
    for pool, count in zip(pools, counts):
        passes, rest = divmod(int(count), len(pool))
        picked = [pool] * passes + [pool[np.sort(rng.permutation(len(pool))[:rest])]]
        chosen.append(np.sort(np.concatenate(picked)))
    return chosen
