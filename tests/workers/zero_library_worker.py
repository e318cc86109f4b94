"""Run under `deepspeed --num_gpus N` (or plain python for the 1-process reference): trains a tiny LLaMA with
selora adapters for a few steps under ZeRO stage 2/3 and writes losses, SVD work counts and owners, which rank
made which base weight whole during the sharded SVDs, and the saved adapters under --out. tests/test_zero.py
compares them with a single-process run.

The same script is the single-process reference when started without a launcher: then it uses a plain
torch AdamW loop over the full global batch, which is what the data-parallel ranks must reproduce.
"""
import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import selora  # noqa: E402
from selora.srlora import SRLoRA  # noqa: E402

METHODS = {
    "lora": (selora.LoRAConfig(r=4, alpha=8), None),
    "selora_pissa": (selora.SeLoRAConfig(r=4, alpha=8, init="pissa", use_dora=True), None),
    "selora_srlora": (selora.SeLoRAConfig(r=4, alpha=8),
                      selora.SRLoRAConfig(start_step=2, end_step=4, interval=2, pairs_per_recomposition=1)),
}
STEPS, GLOBAL_BATCH, LR = 5, 4, 5e-3


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 128, (GLOBAL_BATCH, 16), generator=torch.Generator().manual_seed(1000 + step))


def load_model(path: str, ds_config: dict | None):
    from transformers import AutoModelForCausalLM
    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig
        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay alive while loading: weights load sharded
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        assert hasattr(model.model.layers[0].self_attn.q_proj.weight, "ds_id"), "base not partitioned"
        return model
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)


@contextlib.contextmanager
def recorded_svd_gathers(model, log: list):
    """While selora's sharded SVD scheduler runs, record every base weight this rank takes part in making whole:
    through selora.distributed.gather_to_owner (whole on the owner only) or DeepSpeed's GatheredParameters (whole
    on every rank). One record per call: weight name, the owner asked for, this rank, whether it got the weight."""
    import deepspeed
    from selora import distributed, svd
    names = {id(p): n for n, p in model.named_parameters()}
    rank = distributed.world()[0]
    inside = [False]
    original = {"gather_to_owner": distributed.gather_to_owner,
                "sharded_principal_directions": svd.sharded_principal_directions}
    original_gathered_parameters = deepspeed.zero.GatheredParameters

    def gather_to_owner(param, owner):
        full = original["gather_to_owner"](param, owner)
        if inside[0]:
            log.append({"weight": names.get(id(param)), "owner": owner, "rank": rank, "whole_here": full is not None,
                        "via": "gather_to_owner"})
        return full

    def gathered_parameters(params, *args, **kwargs):
        if inside[0]:
            for param in params if isinstance(params, (list, tuple)) else [params]:
                log.append({"weight": names.get(id(param)), "owner": None, "rank": rank, "whole_here": True,
                            "via": "GatheredParameters"})
        return original_gathered_parameters(params, *args, **kwargs)

    def sharded_principal_directions(*args, **kwargs):
        inside[0] = True
        try:
            return original["sharded_principal_directions"](*args, **kwargs)
        finally:
            inside[0] = False

    replacements = {"gather_to_owner": gather_to_owner, "sharded_principal_directions": sharded_principal_directions}
    # Patch every selora module that holds the functions (they are imported by name), whatever the module layout.
    patched = [(module, name) for module in list(sys.modules.values()) if (module.__name__ or "").startswith("selora")
               for name in replacements if getattr(module, name, None) is original[name]]
    for module, name in patched:
        setattr(module, name, replacements[name])
    deepspeed.zero.GatheredParameters = gathered_parameters
    try:
        yield
    finally:
        for module, name in patched:
            setattr(module, name, original[name])
        deepspeed.zero.GatheredParameters = original_gathered_parameters


def run(method: str, model_path: str, out: Path, stage: int | None) -> None:
    import deepspeed
    adapter_config, srlora_config = METHODS[method]
    rank, world_size = selora.distributed.world()
    ds_config = None
    if stage is not None:
        ds_config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                     "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    torch.manual_seed(0)
    model = load_model(model_path, ds_config)
    selora.apply(model, adapter_config, initialize=False)
    gathers = []
    with recorded_svd_gathers(model, gathers):
        svd = selora.initialize_adapters(model)
    selora.save_adapter(model, out / f"{method}_init_adapter")
    residual = model.model.layers[0].self_attn.q_proj.base_weight()  # gathered under ZeRO-3 (collective)
    if rank == 0:
        torch.save(residual, out / f"{method}_init_q_proj_base.pt")
    with recorded_svd_gathers(model, gathers):
        rec = SRLoRA(model, srlora_config, total_steps=STEPS) if srlora_config else None
    (out / f"{method}_svd_gathers_rank{rank}.json").write_text(json.dumps(gathers))
    svd_owners = {**svd["owners"], **(rec.svd_stats["owners"] if rec else {})}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    if ds_config is not None:
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    losses, events = [], []
    for step in range(1, STEPS + 1):
        ids = batch(step)[rank::world_size]
        if ds_config is not None:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            reported = selora.distributed.all_reduce_sum(loss.detach().clone()) / world_size
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            reported = loss.detach()
        losses.append(reported.item())
        if rec is not None:
            events += rec.step(step, optimizer)
    state = rec.state_dict() if rec else None
    selora.save_adapter(model, out / f"{method}_adapter", extra_state=state)
    computed = torch.tensor(float(svd["computed_here"] + (rec.svd_stats["computed_here"] if rec else 0)))
    per_rank = [0.0] * world_size
    per_rank[rank] = computed.item()
    per_rank = selora.distributed.all_reduce_sum(torch.tensor(per_rank)).tolist()
    if rank == 0:
        (out / f"{method}.json").write_text(json.dumps({"losses": losses, "events": events,
                                                        "svd_computed_per_rank": per_rank, "svd_owners": svd_owners}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default=None,
                        help="comma-separated ZeRO stages, run one after the other into OUT/zero<stage> (one launch)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo")
    stages = [int(stage) for stage in args.stages.split(",")] if args.stages else [None]
    for stage in stages:
        out = Path(args.out) / (f"zero{stage}" if stage is not None else "")
        out.mkdir(parents=True, exist_ok=True)
        for method in args.methods.split(","):
            run(method, args.model, out, stage)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo's threads can abort the exit (pytorch#190489)


if __name__ == "__main__":
    main()
