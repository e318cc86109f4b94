"""SVD initialisation time for the 224 projection matrices of a LLaMA-7B shape (32 layers x q,k,v,o,gate,up,down),
through selora's sharding-aware scheduler (`sharded_principal_directions`), with the matrices partitioned by
DeepSpeed ZeRO-3 when launched on several GPUs.

    python bench/svd_init.py                           # 1 GPU: docs/benchmarks/svd_init_1gpu_<date>.json
    deepspeed --num_gpus 2 bench/svd_init.py           # 2 GPUs, ZeRO-3 partitioned weights: svd_init_2gpu_<date>.json
    python bench/svd_init.py --smoke --out /tmp/x      # CPU, small matrices, seconds (tests/test_bench.py)

Randomized SVD is timed on all 224 matrices through the scheduler. Full SVD goes through the scheduler for the
first --full-layers layers (7 matrices each; all 224 take minutes per GPU) and is also timed on one matrix of
each shape and extrapolated to 224; the randomized directions are checked against the full ones.
"""
from __future__ import annotations

import json
import os
import time

import torch
from torch import nn

from common import argument_parser, pick_device, synchronize, write_results
import selora  # noqa: E402  (common puts the repository on the path)
from selora.svd import principal_directions, sharded_principal_directions  # noqa: E402

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # (out, in) of q,k,v,o,gate,up,down


class Projections(nn.Module):
    def __init__(self, layers: int, shapes: list[tuple[int, int]]):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(i, o, bias=False, dtype=torch.bfloat16)
                                  for _ in range(layers) for (o, i) in shapes)


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--full-layers", type=int, default=4, help="layers whose full SVDs go through the scheduler")
    parser.add_argument("--smoke", action="store_true", help="CPU, widths / 64, 2 layers: seconds")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args(argv)
    device, _dtype, device_name = pick_device(cpu=args.smoke)
    shapes = SHAPES
    if args.smoke:
        shapes, args.layers, args.full_layers, args.rank = [(o // 64, i // 64) for o, i in SHAPES], 2, 1, 4
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3,
                  "stage3_param_persistence_threshold": 0}}
    rank, world_size = selora.distributed.world()
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16) if distributed else device:
        model = Projections(args.layers, shapes)
    selora.apply(model, selora.LoRAConfig(r=args.rank, target_modules=("re:proj\\.\\d+",)), initialize=False)
    layers = selora.adapter_layers(model)
    results = {"gpus": world_size, "matrices": len(layers)}
    subsets = {"randomized": list(layers), "full": list(layers)[: args.full_layers * len(shapes)]}
    results["full_scheduled_matrices"] = len(subsets["full"])
    for method, names in subsets.items():
        chosen = {n: layers[n] for n in names}
        synchronize(device)
        if distributed:
            torch.distributed.barrier()
        start = time.perf_counter()
        directions, stats = sharded_principal_directions(chosen, {n: args.rank for n in chosen}, method=method)
        synchronize(device)
        if distributed:
            torch.distributed.barrier()
        results[f"{method}_s"] = time.perf_counter() - start
        results[f"{method}_computed_here"] = stats["computed_here"]
    if rank != 0:
        return results
    # Full SVD: one matrix per shape, extrapolated; and the randomized directions' accuracy against it.
    full_per_shape, errors = {}, []
    for out_f, in_f in dict.fromkeys(shapes):
        weight = torch.randn(out_f, in_f, device=device)
        synchronize(device)
        start = time.perf_counter()
        exact = principal_directions(weight, args.rank, method="full")
        synchronize(device)
        full_per_shape[f"{out_f}x{in_f}"] = time.perf_counter() - start
        approx = principal_directions(weight, args.rank, method="randomized")
        errors.append(((approx.S - exact.S).abs() / exact.S).max().item())
    counts = {f"{o}x{i}": shapes.count((o, i)) * args.layers for (o, i) in dict.fromkeys(shapes)}
    results["full_extrapolated_s_1gpu"] = sum(full_per_shape[k] * counts[k] for k in counts)
    results["full_s_per_shape"] = full_per_shape
    results["randomized_max_rel_singular_value_error"] = max(errors)
    print(json.dumps(results, indent=2))
    write_results(args.out, f"svd_init_{world_size}gpu", None, results, device_name)
    return results


if __name__ == "__main__":
    main()
