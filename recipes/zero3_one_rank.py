"""ZeRO-3 on one rank, without the machinery that has nothing to do there.

On one rank a ZeRO-3 partition is the whole model: with every weight kept gathered (the persistence threshold
`recipes.engine.keeps_one_rank_gathered` fills), nothing is ever fetched, released or reduced across ranks, yet
DeepSpeed (0.19.8) still runs its per-layer fetch and release hooks, releases and re-gathers every weight around
each optimizer step, sends each gradient through a per-weight hook, a bucket copy and a reduce-scatter over a world
of one, and takes the clipping norm one gradient at a time. `switch_off` replaces those four, after
``deepspeed.initialize``, and returns what it replaced, in words, for the run's log. Each is left in place where
this DeepSpeed lacks what it replaces, and all but the first where the optimizer is offloaded (its swap paths need
the releases and DeepSpeed's gradient path).

tests/test_engine.py compares every change with DeepSpeed's own path: the same losses and gradients (bit for bit
where nothing is reordered), eager and with compiled decoder regions, in float32 and DeepSpeed's bf16 mode, across
a frozen weight changed in a ``GatheredParameters`` context and across a checkpoint resumed by a new engine;
bench/host_calls.py counts the Python each saves.
"""
from __future__ import annotations

import torch

from selora.distributed import whole_is_its_partition

# DeepSpeed's stage-3 optimizer keeps each trained weight's gradient partition, a view of one flat float32 buffer,
# in this name-mangled dict (keyed by the weight's ds_id); its step reads the gradients from there.
GRADIENT_PARTITIONS = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"


def switch_off(ds_engine) -> list[str]:
    """Applies the one-rank changes to ``ds_engine`` (``deepspeed.initialize``'s engine, ZeRO-3, one rank,
    every weight kept gathered); returns a phrase for each one made."""
    made = []
    if drop_fetch_hooks(ds_engine):
        made.append("its per-layer fetch and release hooks, with nothing to do, are off")
    if keep_weights_through_step(ds_engine):
        made.append("its optimizer step no longer releases and re-gathers them")
    if gradients_straight_to_partitions(ds_engine):
        made.append("each backward writes its gradients straight into their partitions (no per-weight hooks, "
                    "buckets or reduce-scatter)")
    if gradient_norm_in_one_pass(ds_engine):
        made.append("the clipping norm is taken over all gradients at once")
    return made


def drop_fetch_hooks(ds_engine) -> bool:
    """Removes ZeRO-3's per-module fetch and release hooks, which on one rank with every weight kept gathered have
    nothing to fetch or release and only cost host time at every layer's forward, recomputation and backward
    (`fetch_sub_module`, `release_sub_module`, their parameter walks and stream waits). DeepSpeed's own method
    does it, as its DeepCompile does when it takes over the gathering.

    What the hooks did once remains to do: gather a weight that is released. DeepSpeed releases every weight
    when it writes a checkpoint (and gathers them again after), and a ``GatheredParameters`` context (SRLoRA's
    recomposition, a merge) releases its weights on leaving. One hook before each forward of the whole model
    gathers whatever is released then, every weight at the first forward; it runs outside the compiled decoder
    regions, which cannot gather (under TorchDynamo DeepSpeed's gather-on-access is off, and a compiled region
    that meets a released weight fails). Returns False, the hooks kept, where this DeepSpeed has no such method."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    remove_hooks = getattr(getattr(ds_engine.optimizer, "parameter_offload", None), "_remove_module_hooks", None)
    if remove_hooks is None:
        return False
    remove_hooks()
    parameters = list(ds_engine.module.parameters())

    def gather_released(module, args) -> None:
        released = [p for p in parameters if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if released:
            released[0].all_gather(param_list=released)

    ds_engine.module.register_forward_pre_hook(gather_released)
    return True


def keep_weights_through_step(ds_engine) -> bool:
    """Stops ZeRO-3's optimizer from releasing every weight before its step and gathering it again after
    (`_partition_all_parameters`, then `_post_step`'s gather of the persistent weights). On one rank a gather of
    several weights makes each whole a view of its partition, which the step then updates in place: the round
    trip changes nothing, yet it walks every parameter twice (739 at the 1.3B shape) and ends in a whole-device
    synchronisation (`NoGatherCoalescedHandle.wait`, DeepSpeed 0.19.8), after which the next step's first kernels
    meet an idle GPU.

    Instead, before the step, a weight whose whole is a copy (DeepSpeed gathers a lone weight into a new buffer:
    the first forward's, and any that a ``GatheredParameters`` context, saving or SRLoRA, left released and a
    forward gathered again) is made a view of its partition, as DeepSpeed's one-rank gather of several makes it:
    the two hold the same values then (the optimizer has not run), and the step's update reaches the view. A
    checkpoint still releases every weight first, as DeepSpeed does (its ZeRO-3 module file holds the released,
    empty weights; the partitions hold the values). Returns False, the round trip kept, where this DeepSpeed's
    optimizer has no such method, or where it offloads its state (whose swap paths release every weight to
    refresh the partitions)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    optimizer = ds_engine.optimizer
    release_all = getattr(optimizer, "_partition_all_parameters", None)
    if not callable(release_all) or getattr(optimizer, "offload_optimizer", True):
        return False
    parameters = list(ds_engine.module.parameters())

    def view_partitions() -> None:
        for param in parameters:
            if param.ds_status == ZeroParamStatus.AVAILABLE and not whole_is_its_partition(param):
                param.data = param.ds_tensor.data.narrow(0, 0, param.ds_numel).view(param.ds_shape)

    optimizer._partition_all_parameters = view_partitions
    optimizer.checkpoint_event_prologue = release_all
    return True


def gradients_straight_to_partitions(ds_engine) -> bool:
    """Replaces ZeRO-3's gradient reduction, which on one rank reduces nothing: a hook on every trained weight's
    gradient (and a full backward hook on every whole-gathered layer, which wraps the layer's inputs and outputs
    at each forward and recomputation) copies the gradient into a bucket, a full bucket is reduce-scattered over
    a world of one, and each gradient is then copied or added into its float32 partition, one weight at a time:
    about 670 trained weights at the 1.3B shape, several kernels and DeepSpeed's bookkeeping each, per micro-batch.

    Instead the hooks are removed: autograd leaves each gradient in ``.grad``, as in plain PyTorch, and at the end
    of each backward (DeepSpeed's epilogue, which every ``engine.backward`` runs) one batched copy writes them all
    into their partitions, or one batched add after the first micro-batch of an optimizer step, converted to the
    partition's float32 as DeepSpeed converts them; then the gradients are dropped, and DeepSpeed's epilogue runs
    as before (its buckets are empty). A trained weight without a gradient counts as a zero one, as DeepSpeed's
    layer hook makes it. Returns False, DeepSpeed's path kept, where this DeepSpeed's optimizer lacks what this
    replaces, offloads its state, or reduces gradients its own other ways (ZenFlow, coalesced reduction)."""
    optimizer = ds_engine.optimizer
    if (not hasattr(optimizer, GRADIENT_PARTITIONS) or getattr(optimizer, "offload_optimizer", True)
            or getattr(optimizer, "zenflow", True) or getattr(optimizer, "_coalesce_grad_reduction", True)
            or not all(hasattr(optimizer, name) for name in ("_grad_acc_hooks", "_leaf_module_hooks",
                                                             "independent_gradient_partition_epilogue",
                                                             "micro_step_id", "fp16_groups"))):
        return False
    trained = [param for group in optimizer.fp16_groups for param in group if param.requires_grad]
    if any(param.partition_numel() != param.ds_numel for param in trained):  # not one rank
        return False
    for handle in (*optimizer._grad_acc_hooks, *optimizer._leaf_module_hooks):
        handle.remove()
    optimizer._grad_acc_hooks.clear()
    optimizer._leaf_module_hooks.clear()
    epilogue = optimizer.independent_gradient_partition_epilogue

    @torch.no_grad()
    def write_gradients_then_epilogue() -> None:
        table = getattr(optimizer, GRADIENT_PARTITIONS)  # looked up each time: DeepSpeed rebuilds it on reloads
        partitions, gradients, missing = [], [], []
        for param in trained:
            if param.grad is None:
                missing.append(table[param.ds_id])
            else:
                partitions.append(table[param.ds_id])
                gradients.append(param.grad.reshape(-1))
                param.grad = None
        if optimizer.micro_step_id == 0:  # the first micro-batch of an optimizer step
            if partitions:
                torch._foreach_copy_(partitions, gradients)
            if missing:
                torch._foreach_zero_(missing)
        elif partitions:
            torch._foreach_add_(partitions, gradients)
        epilogue()

    optimizer.independent_gradient_partition_epilogue = write_gradients_then_epilogue
    return True


def gradient_norm_in_one_pass(ds_engine) -> bool:
    """Takes the gradient norm for clipping over every gradient partition in one batched norm (torch's
    ``_foreach_norm``, as ``torch.nn.utils.clip_grad_norm_`` and so the plain engine and PEFT's loop take it),
    instead of DeepSpeed's two kernels and a few Python calls per trained weight (about 670 at the 1.3B shape)
    and an all-reduce over a world of one. The per-weight norms are combined in float64 as DeepSpeed combines them,
    and a norm that is not finite is reported as DeepSpeed reports it (-1, which skips the step). A norm other
    than 2 goes to DeepSpeed's. Returns False where this DeepSpeed's optimizer has no such method, or offloads its
    state (whose norm comes from the host)."""
    from deepspeed.runtime.zero.utils import get_norm_dtype

    optimizer = ds_engine.optimizer
    per_weight = getattr(optimizer, "get_grad_norm_direct", None)
    if not callable(per_weight) or getattr(optimizer, "offload_optimizer", True):
        return False
    dtype = get_norm_dtype()

    @torch.no_grad()
    def norm_of_all(gradients, params, norm_type=2):
        if float(norm_type) != 2.0 or not gradients:
            return per_weight(gradients, params, norm_type)
        norms = torch.stack(torch._foreach_norm(gradients, 2.0, dtype=dtype))
        total = norms.pow(2.0).sum().sqrt()
        return torch.where(total.isfinite(), total, torch.tensor(-1.0, dtype=total.dtype, device=total.device))

    optimizer.get_grad_norm_direct = norm_of_all
    return True
