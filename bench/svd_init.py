"""SVD initialisation time for the 224 projection matrices of a LLaMA-7B shape (32 layers x q,k,v,o,gate,up,down),
through selora's sharding-aware scheduler (`sharded_principal_directions`), with the matrices partitioned by
DeepSpeed ZeRO-3 when launched on several GPUs.

    python bench/svd_init.py --out docs/benchmarks                       # 1 GPU
    deepspeed --num_gpus 2 bench/svd_init.py --out docs/benchmarks       # 2 GPUs, ZeRO-3 partitioned weights
    python bench/svd_scaling.py --gpus 1,2,4 --out docs/benchmarks       # 1, 2 and 4 GPUs, one table

Randomized SVD is timed on all 224 matrices through the scheduler. Full SVD goes through the scheduler for the
first --full-layers layers (7 matrices each; all 224 take minutes per GPU) and is also timed on one matrix of
each shape and extrapolated to 224; the randomized directions are checked against the full ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import selora  # noqa: E402
from selora.svd import principal_directions, sharded_principal_directions  # noqa: E402

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # (out, in) of q,k,v,o,gate,up,down


class Projections(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(i, o, bias=False, dtype=torch.bfloat16)
                                  for _ in range(layers) for (o, i) in SHAPES)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--full-layers", type=int, default=4, help="layers whose full SVDs go through the scheduler")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank, world_size = selora.distributed.world()
    torch.manual_seed(0)
    if distributed:
        import deepspeed
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3,
                  "stage3_param_persistence_threshold": 0}}
        with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
            model = Projections(args.layers)
    else:
        with torch.device("cuda"):
            model = Projections(args.layers)
    selora.apply(model, selora.LoRAConfig(r=args.rank, target_modules=("re:proj\\.\\d+",)), initialize=False)
    layers = selora.adapter_layers(model)
    results = {"device": torch.cuda.get_device_name(), "gpus": world_size, "matrices": len(layers)}
    subsets = {"randomized": list(layers), "full": list(layers)[: args.full_layers * len(SHAPES)]}
    results["full_scheduled_matrices"] = len(subsets["full"])
    for method, names in subsets.items():
        chosen = {n: layers[n] for n in names}
        torch.cuda.synchronize()
        if distributed:
            torch.distributed.barrier()
        start = time.perf_counter()
        directions, stats = sharded_principal_directions(chosen, {n: args.rank for n in chosen}, method=method)
        torch.cuda.synchronize()
        if distributed:
            torch.distributed.barrier()
        results[f"{method}_s"] = time.perf_counter() - start
        results[f"{method}_computed_here"] = stats["computed_here"]
    if rank == 0:
        # Full SVD: one matrix per shape, extrapolated; and the randomized directions' accuracy against it.
        full_per_shape, errors = {}, []
        for index, (out_f, in_f) in enumerate(dict.fromkeys(SHAPES)):
            weight = torch.randn(out_f, in_f, device="cuda")
            torch.cuda.synchronize()
            start = time.perf_counter()
            exact = principal_directions(weight, args.rank, method="full")
            torch.cuda.synchronize()
            full_per_shape[f"{out_f}x{in_f}"] = time.perf_counter() - start
            approx = principal_directions(weight, args.rank, method="randomized")
            errors.append(((approx.S - exact.S).abs() / exact.S).max().item())
        counts = {f"{o}x{i}": SHAPES.count((o, i)) * args.layers for (o, i) in dict.fromkeys(SHAPES)}
        results["full_extrapolated_s_1gpu"] = sum(full_per_shape[k] * counts[k] for k in counts)
        results["full_s_per_shape"] = full_per_shape
        results["randomized_max_rel_singular_value_error"] = max(errors)
        print(json.dumps(results, indent=2))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"svd_init_{world_size}gpu.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
