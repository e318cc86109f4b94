"""recipes/engine.py without launching DeepSpeed: which modules ZeRO-3 gathers whole, the learning-rate schedule
both engines step (DeepSpeed in one in-process rank), float16's loss scaler on the plain engine."""
import json
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from recipes import compiled_regions, engine, finetune, fused_loss, validate as validation, zero3_one_rank
from recipes.compiled_regions import compile_regions
from recipes.fused_loss import use_fused_loss
from conftest import SMALL_RUN, TINY_MODEL, free_port
from recipes.modeling import preset_config
from test_fused_loss import CUDA, losses, reference_loss


@pytest.fixture
def tiny_llama():
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**preset_config("tiny_llama")))


def leaves(model):
    return sorted({type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)})


@pytest.mark.parametrize("checkpointing", [True, False])
def test_zero3_gathers_each_decoder_layer_whole(tiny_llama, checkpointing):
    tiny_llama.requires_grad_(False)  # a frozen base, as under adapters
    if checkpointing:
        tiny_llama.gradient_checkpointing_enable()
    units = engine.whole_layer_fetch(tiny_llama, {"zero_optimization": {"stage": 3}})
    assert units == ["LlamaDecoderLayer"]
    assert leaves(tiny_llama) == ["LlamaDecoderLayer"]
    assert sum(getattr(m, "_z3_leaf", False) for m in tiny_llama.modules()) == len(tiny_llama.model.layers)
    # the first layer's input carries a gradient (transformers' checkpointing makes it so; without it, the
    # engine), so DeepSpeed's hook on that layer waits for the layer's backward
    embedded = tiny_llama.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    assert embedded.requires_grad and len(tiny_llama.get_input_embeddings()._forward_hooks) == 1


@pytest.mark.parametrize("case", ["zero2", "threshold set", "no input gradients to enable"])
def test_per_module_fetch_is_left_alone(tiny_llama, case):
    """Under ZeRO-2, when the config chooses DeepSpeed's own granularity rule, and for a model that neither
    checkpoints nor can make its inputs require a gradient, nothing is marked."""
    model = tiny_llama
    zero = {"stage": 2 if case == "zero2" else 3}
    if case == "threshold set":
        zero["stage3_module_granularity_threshold"] = 1000
    if case == "no input gradients to enable":
        model = torch.nn.Sequential(tiny_llama.model.layers[0])
        model._no_split_modules = ["LlamaDecoderLayer"]
    assert engine.whole_layer_fetch(model, {"zero_optimization": zero}) == []
    assert leaves(model) == []


def test_deepspeeds_parser_judges_a_config_for_several_processes_before_their_group_exists():
    """validate runs before torch.distributed starts, where DeepSpeed's parser sees one process: a valid config for
    four ranks passes, and a key DeepSpeed refuses is named whatever the world size."""
    from launch.config import resolve
    from recipes.engine import EngineConfigError, check_deepspeed_config, deepspeed_config
    for world_size in (1, 4):
        good = resolve("llama_selora", ["deepspeed.config=zero3", *TINY_MODEL])
        check_deepspeed_config(good, deepspeed_config(good, world_size))
        bad = resolve("llama_selora", ["deepspeed.config=zero2", *TINY_MODEL,
                                       "deepspeed.overrides={zero_optimization: {offload_param: {device: gpu}}}"])
        with pytest.raises(EngineConfigError, match=r"zero_optimization\.offload_param\.device = 'gpu'"):
            check_deepspeed_config(bad, deepspeed_config(bad, world_size))


# ----- the learning-rate schedule: one path for both engines ----------------------------------------------------
STEPS, WARMUP, PEAK = 10, 2, 1e-2


@pytest.fixture(scope="module")
def one_process_group():
    """A one-process gloo group for in-process DeepSpeed engines (as recipes/finetune.py makes without a launcher),
    shared by the module's tests (DeepSpeed caches its groups) and taken down after them."""
    import os

    import deepspeed
    import torch.distributed as dist

    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()
    deepspeed.comm.comm.cdb = None
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def schedule_config(kind: str, *extra: str):
    from launch.config import resolve
    return resolve("llama_lora", ["model.preset=tiny_llama", f"train.lr_scheduler={kind}", f"train.learning_rate={PEAK}",
                                  f"train.warmup_steps={WARMUP}", "train.gradient_accumulation_steps=2",
                                  "train.micro_batch_size=1", *extra])


def lr_sequence(engine, steps: int) -> list[float]:
    """The lr of each optimizer step (read before it, as the loop does); 2 micro-batches of a tiny loss each."""
    lrs = []
    for _ in range(steps):
        for _ in range(engine.accumulation):
            loss = engine(input=torch.ones(1, 4)).sum()
            engine.backward(loss)
            lr = engine.current_lr()
            engine.step()
        lrs.append(lr)
    return lrs


def build(kind_of_engine: str, cfg):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    if kind_of_engine == "plain":
        return engine.PlainEngine(model, cfg, STEPS)
    return engine.DeepSpeedEngine(model, engine.deepspeed_config(cfg, 1), cfg.train, STEPS)


@pytest.mark.parametrize("kind,extra", [("cosine", ["train.min_lr_ratio=0.1"]), ("linear", []), ("constant", []),
                                        ("wsd", ["train.min_lr_ratio=0.1", "train.decay_ratio=0.3"])])
def test_both_engines_step_the_same_schedule_and_resume_it(tmp_path, one_process_group, kind, extra):
    plain_cfg = schedule_config(kind, *extra)
    ds_cfg = schedule_config(kind, *extra, "deepspeed.config=zero2")
    sequences = {}
    for name, cfg in (("plain", plain_cfg), ("deepspeed", ds_cfg)):
        first = build(name, cfg)
        lrs = lr_sequence(first, 4)
        first.save(tmp_path / name / "step_4")
        resumed = build(name, cfg)
        resumed.load(tmp_path / name / "step_4")  # the schedule continues where the checkpoint left it
        sequences[name] = lrs + lr_sequence(resumed, STEPS - 4)
    assert sequences["deepspeed"] == pytest.approx(sequences["plain"], rel=1e-9, abs=1e-15)
    lrs = sequences["plain"]
    start = 0.1 * PEAK if kind == "wsd" else 0.0  # transformers' wsd warms up from its floor
    assert lrs[:3] == pytest.approx([start, (start + PEAK) / 2, PEAK])  # linear warm-up over 2 steps
    expected_last = {"cosine": None, "linear": PEAK / 8, "constant": PEAK, "wsd": None}[kind]
    if kind == "cosine":  # half a cosine from the peak down to the floor (0.1 x peak) at step 10
        assert lrs[-1] == pytest.approx(PEAK * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8))))
    elif kind == "wsd":  # stable at the peak, then the last 3 steps decay (from the peak) towards the floor
        assert lrs[2:8] == pytest.approx([PEAK] * 6) and PEAK * 0.1 < lrs[9] < lrs[8] < PEAK
    else:
        assert lrs[-1] == pytest.approx(expected_last)


def test_a_deepspeed_json_with_a_scheduler_of_its_own_is_refused(tmp_path):
    from launch.config import resolve
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "scheduler": {"type": "WarmupLR", "params": {}}}))
    cfg = resolve("llama_lora", ["model.preset=tiny_llama", f"deepspeed.config={path}"])
    with pytest.raises(engine.EngineConfigError, match="sets scheduler type 'WarmupLR'.*train.lr_scheduler"):
        engine.deepspeed_json(cfg)
    path.write_text(json.dumps({"train_batch_size": "auto", "scheduler": {"type": "auto", "params": {}}}))
    assert "scheduler" not in engine.deepspeed_json(cfg)  # an older JSON's "auto" section is simply dropped


# ----- float16: a dynamic loss scale on the plain engine ----------------------------------------------------------
def fp16_engine(dtype: str = "float16"):
    from launch.config import resolve
    cfg = resolve("llama_lora", ["model.preset=tiny_llama", f"model.dtype={dtype}", "train.warmup_steps=0",
                                 "train.gradient_accumulation_steps=1", "train.learning_rate=0.1",
                                 "train.max_grad_norm=100"])  # clipping the scaled gradients would show
    torch.manual_seed(0)
    return engine.PlainEngine(torch.nn.Linear(4, 4), cfg, STEPS)


def test_float16_training_gets_a_loss_scaler_and_an_overflow_skips_the_step():
    assert fp16_engine("float32").scaler is None and fp16_engine("bfloat16").scaler is None
    plain = fp16_engine()
    assert plain.scaler is not None and plain.scaler.is_enabled()
    scale = plain.scaler.get_scale()
    before = [p.detach().clone() for p in plain.params]
    plain.backward(plain(input=torch.full((1, 4), float("inf"))).sum())  # an overflowing micro-batch
    plain.step()
    assert all(torch.equal(p, b) for p, b in zip(plain.params, before))  # the step was skipped
    assert plain.scaler.get_scale() == scale / 2  # and the scale lowered
    assert plain.scheduler.last_epoch == 0  # the schedule did not advance (as DeepSpeed's fp16)
    grads = []
    plain.optimizer.register_step_pre_hook(lambda *_: grads.append([p.grad.clone() for p in plain.params]))
    x = torch.ones(1, 4)
    plain.backward(plain(input=x).sum())
    plain.step()
    assert not all(torch.equal(p, b) for p, b in zip(plain.params, before))  # a finite step updates
    torch.testing.assert_close(grads[0][0], x.expand(4, 4))  # the optimizer saw (and clipped) the unscaled gradient
    assert plain.scheduler.last_epoch == 1


def test_float16_recipe_trains_on_the_cpu_with_the_scaler_in_its_checkpoint(tmp_path):
    """A whole (2-step) float16 run of the plain engine on the CPU, where torch computes float16: finite losses, the
    adapter kept in float32 under the float16 base, the scaler's state in the checkpoint."""
    from launch.config import resolve
    from recipes import finetune

    cfg = resolve("llama_lora", ["model.preset=tiny_llama", "model.dtype=float16", "data.max_train_records=4",
                                 "train.micro_batch_size=2", "train.gradient_accumulation_steps=1", "train.max_steps=2",
                                 "train.warmup_steps=0", "train.eval_every=0", "train.save_every=2",
                                 "train.tensorboard=false", "train.export_peft=false", f"train.output_dir={tmp_path}"])
    finetune.run(cfg)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [math.isfinite(l["loss"]) for l in lines if "loss" in l] == [True, True]
    state = torch.load(tmp_path / "checkpoints" / "step_2" / "engine" / engine.ENGINE_STATE_FILE, weights_only=True)
    assert state["scaler"]["scale"] > 0
    assert state["optimizer"]["state"][0]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("dtype,fp16", [("float16", True), ("float32", False), ("bfloat16", False)])
def test_deepspeed_turns_its_loss_scale_on_for_float16(dtype, fp16):
    """DeepSpeed's "fp16" section follows model.dtype (its own dynamic loss scale, the plain engine's GradScaler);
    bf16 is never on together with it. Not run under DeepSpeed here: its fp16 optimizer needs a GPU."""
    from launch.config import resolve
    config = engine.deepspeed_config(resolve("llama_lora", [f"model.dtype={dtype}", "deepspeed.config=zero2"]), 1)
    assert config["fp16"]["enabled"] is fp16
    assert not (config["fp16"]["enabled"] and config["bf16"]["enabled"])


# ----- ZeRO-3's fetch units, trained -----------------------------------------------------------------------------
TRAINED = ("q_proj.weight", "v_proj.weight")


class Zero3Run(NamedTuple):
    units: list[str]            # the fetch units
    losses: list[float]
    gradients: dict             # the first step's whole gradients of the trained weights
    released: list[str]         # the weights left released after the steps
    keeps_gathered: bool        # the engine's keeps_weights_gathered
    layer_hooks: int            # forward (pre-)hooks left on the first decoder layer: ZeRO-3's fetch and release
    copies: list[str]           # gathered weights whose whole is a copy, not a view of their partition
    freed_in_last_step: int     # weights released during the last micro-step (forward, backward and step)
    accumulated: dict           # the whole gradients of the trained weights summed over the first optimizer step
    gradient_hooks: int         # ZeRO-3's gradient-reduction hooks left (per weight, and per whole-gathered layer)
    gradient_norms: list[float] # DeepSpeed's global gradient norm after each optimizer step (before clipping)
    weight_dtype: torch.dtype   # the trained weights' (DeepSpeed's bf16 mode makes them bfloat16)
    one_rank_changes: list[str] # what recipes/zero3_one_rank.py switched off


def zero3_run(checkpointing: bool, steps: int = 3, partitioned: bool = True, resume_from: Path | None = None,
              compiled: bool = False, bf16: bool = False, offload_optimizer: bool = False) -> Zero3Run:
    """A few ZeRO-3 steps of the tiny LLaMA, its attention projections trained. ``partitioned``: every parameter
    partitioned (persistence threshold 0), else the threshold the engine fills for one rank. After the second
    micro-batch (the first optimizer step) a frozen weight is changed in a GatheredParameters context, as SRLoRA's
    recomposition does, which leaves it released. ``resume_from``: the first optimizer step's checkpoint is written
    there just before, and the run goes on in a new engine over a new model that loads it. ``compiled``: the
    decoder regions compiled as the recipe does on a GPU (the caller sets a backend that runs on the CPU).
    ``bf16``: DeepSpeed's bf16 mode, as on a GPU (bfloat16 weights and gradients, float32 partitions of them).
    ``offload_optimizer``: the optimizer's state and step on the host (DeepSpeed's offload_optimizer)."""
    from deepspeed.utils import safe_get_full_grad
    from launch.config import resolve
    persistence = ", ".join((["stage3_param_persistence_threshold: 0"] if partitioned else [])
                            + (["offload_optimizer: {device: cpu}"] if offload_optimizer else []))
    cfg = resolve("llama_lora", [*TINY_MODEL, "deepspeed.config=zero3", "train.learning_rate=1e-2",
                                 "train.warmup_steps=0", f"deepspeed.overrides={{zero_optimization: {{{persistence}}}, "
                                 f"optimizer: {{params: {{torch_adam: true}}}}, bf16: {{enabled: {str(bf16).lower()}}}}}"])

    def new_engine():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**preset_config("tiny_llama")))
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.endswith(TRAINED))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        built = engine.DeepSpeedEngine(model, engine.sized_for_model(engine.deepspeed_config(cfg, 1), 64), cfg.train,
                                       10)
        if compiled:
            torch._dynamo.reset()
            compile_regions(built.module)
        built.train()
        return built

    from deepspeed.runtime.zero import partition_parameters
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    freed = []
    free_param = partition_parameters.free_param

    def counting_free_param(param):
        freed.append(param)
        free_param(param)

    built = new_engine()
    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    losses, first_gradients, accumulated, gradient_norms = [], {}, {}, []

    def whole_gradients():
        return {name: safe_get_full_grad(parameter).clone()
                for name, parameter in built.module.named_parameters() if name.endswith(TRAINED)}

    try:
        for step in range(steps):
            freed.clear()
            partition_parameters.free_param = counting_free_param if step == steps - 1 else free_param
            loss = built(input_ids=tokens, labels=tokens).loss
            built.backward(loss)
            if step == 0:
                first_gradients = whole_gradients()
            if step == 1:  # both micro-batches of the first optimizer step
                accumulated = whole_gradients()
            if built.step():
                gradient_norms.append(float(built.ds.get_global_grad_norm()))
            losses.append(loss.item())
            if step == 1 and resume_from is not None:  # the end of the first optimizer step (2 micro-batches)
                built.save(resume_from / "step_1")
                built = new_engine()
                built.load(resume_from / "step_1")
            if step == 1:
                import deepspeed
                weight = built.module.model.layers[0].mlp.up_proj.weight
                with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
                    weight.data.mul_(1.5)
                assert weight.numel() == 0
    finally:  # a failing run must not leave DeepSpeed's free_param counting for the tests after it
        partition_parameters.free_param = free_param
    released = sorted(name for name, parameter in built.module.named_parameters() if parameter.numel() == 0)
    copies = sorted(name for name, parameter in built.module.named_parameters()
                    if parameter.ds_status == ZeroParamStatus.AVAILABLE
                    and parameter.data_ptr() != parameter.ds_tensor.data_ptr())
    layer = built.module.model.layers[0]
    gradient_hooks = len(built.optimizer._grad_acc_hooks) + len(built.optimizer._leaf_module_hooks)
    return Zero3Run(built.fetch_units, losses, first_gradients, released, built.keeps_weights_gathered,
                    len(layer._forward_pre_hooks) + len(layer._forward_hooks), copies, len(freed), accumulated,
                    gradient_hooks, gradient_norms, layer.self_attn.q_proj.weight.dtype,
                    built.one_rank_changes)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_zero3_trains_the_same_with_each_layer_gathered_whole(one_process_group, monkeypatch, checkpointing):
    """Whole-layer gathers give per-module fetch's gradients (the first layer's included: without checkpointing
    its weights were met released before the inputs were made to require a gradient) and losses."""
    units, whole, whole_gradients, *_ = zero3_run(checkpointing)
    assert units == ["LlamaDecoderLayer"] and whole[-1] < whole[0]
    monkeypatch.setattr(engine, "whole_layer_fetch", lambda model, config: [])
    _, per_module, per_module_gradients, *_ = zero3_run(checkpointing)
    assert whole == pytest.approx(per_module, rel=1e-6)
    assert sorted(whole_gradients) == sorted(per_module_gradients) and len(whole_gradients) == 4
    for name, gradient in per_module_gradients.items():
        assert gradient.norm() > 0
        torch.testing.assert_close(whole_gradients[name], gradient, rtol=1e-5, atol=1e-7)


def test_zero3_on_one_rank_keeps_every_weight_gathered_and_trains_the_same(one_process_group):
    """On one rank ZeRO-3 fills the persistence threshold so that no weight is ever released (its partition is the
    whole model), drops the per-layer fetch and release hooks that then have nothing to do and the optimizer's
    release and re-gather of every weight around its step: the same losses and gradients as with every weight
    partitioned (a weight changed in a GatheredParameters context after the first step, which leaves it released,
    included: it is gathered again for the next forward), and after two optimizer steps nothing is released, every
    whole is a view of its partition, and the last step released no weight (partitioned: every frozen base matrix
    is released, at every layer)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gathered = zero3_run(checkpointing=True, steps=4, partitioned=False)
    assert gathered.keeps_gathered and gathered.released == [] and gathered.layer_hooks == 0
    assert gathered.copies == [] and gathered.freed_in_last_step == 0
    # DeepSpeed's gradient reduction calls an API torch deprecates: one warning per bucket, silenced by the engine
    assert not [w for w in caught if "reduce_scatter_tensor" in str(w.message)]
    partitioned = zero3_run(checkpointing=True, steps=4, partitioned=True)
    assert not partitioned.keeps_gathered and partitioned.layer_hooks > 0 and partitioned.freed_in_last_step > 0
    assert "model.layers.0.mlp.up_proj.weight" in partitioned.released
    assert gathered.losses == pytest.approx(partitioned.losses, rel=1e-6) and gathered.losses[-1] < gathered.losses[0]
    for name, gradient in partitioned.gradients.items():
        torch.testing.assert_close(gathered.gradients[name], gradient, rtol=1e-5, atol=1e-7)


def test_zero3_on_one_rank_without_the_fetch_hooks_trains_compiled_regions(one_process_group, monkeypatch, tmp_path):
    """Compiled decoder regions cannot gather a weight (DeepSpeed's gather-on-access is off under TorchDynamo):
    without the fetch hooks, the weights released at start, by the GatheredParameters change after the first step
    and by writing a checkpoint are gathered before each forward of the model, so the compiled run gives the eager
    run's losses and resumes exactly (before, its first forward failed: 'Attempting to broadcast a dimension ...'
    on a norm's released weight)."""
    monkeypatch.setattr(compiled_regions, "BACKEND", "aot_eager")
    eager = zero3_run(checkpointing=True, steps=4, partitioned=False)
    compiled = zero3_run(checkpointing=True, steps=4, partitioned=False, compiled=True, resume_from=tmp_path)
    assert compiled.layer_hooks == 0 and compiled.released == [] and compiled.copies == []
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-6)


def test_zero3_on_one_rank_without_the_fetch_hooks_resumes_exactly(one_process_group, tmp_path):
    """A checkpoint written after the first optimizer step (DeepSpeed's save releases and re-gathers the weights)
    and loaded by a new engine over a new model: the steps after it give the uninterrupted run's losses, bit for
    bit."""
    straight = zero3_run(checkpointing=True, steps=4, partitioned=False)
    resumed = zero3_run(checkpointing=True, steps=4, partitioned=False, resume_from=tmp_path)
    assert resumed.layer_hooks == 0 and resumed.released == [] and resumed.copies == []
    assert resumed.losses == straight.losses and straight.losses[-1] < straight.losses[0]


@pytest.mark.parametrize("bf16", [False, True])
def test_zero3_on_one_rank_writes_gradients_straight_into_their_partitions(one_process_group, monkeypatch, bf16):
    """On one rank ZeRO-3's gradient reduction (a hook per trained weight and per whole-gathered layer, a bucket
    copy and a reduce-scatter over a world of one per gradient) is replaced by one batched copy, or add, of every
    gradient into its partition at the end of each backward: no gradient hook is left, and the first micro-batch's
    gradients, their sum over the optimizer step's two micro-batches (the same tokens twice: twice the first) and
    the losses are DeepSpeed's own path's, bit for bit; in float32, and in DeepSpeed's bf16 mode as on a GPU
    (bfloat16 gradients into float32 partitions)."""
    direct = zero3_run(checkpointing=True, steps=4, partitioned=False, bf16=bf16)
    monkeypatch.setattr(zero3_one_rank, "gradients_straight_to_partitions", lambda ds_engine: False)
    hooked = zero3_run(checkpointing=True, steps=4, partitioned=False, bf16=bf16)
    assert direct.gradient_hooks == 0 and hooked.gradient_hooks > 0
    assert direct.weight_dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert direct.losses == hooked.losses and direct.losses[-1] < direct.losses[0]
    assert sorted(direct.gradients) == sorted(hooked.gradients) and len(direct.gradients) == 4
    for name, gradient in hooked.gradients.items():
        assert gradient.norm() > 0 and torch.equal(direct.gradients[name], gradient)
        assert torch.equal(direct.accumulated[name], hooked.accumulated[name])
        assert torch.equal(direct.accumulated[name], 2 * gradient)


def test_zero3_on_one_rank_takes_the_clipping_norm_in_one_pass(one_process_group, monkeypatch):
    """On one rank the gradient norm for clipping is one batched norm over every gradient partition instead of
    DeepSpeed's two kernels per weight: the same norms (clipping on: above train.max_grad_norm=1) and losses."""
    one_pass = zero3_run(checkpointing=True, steps=6, partitioned=False)
    monkeypatch.setattr(zero3_one_rank, "gradient_norm_in_one_pass", lambda ds_engine: False)
    per_weight = zero3_run(checkpointing=True, steps=6, partitioned=False)
    assert len(one_pass.gradient_norms) == 3 and min(per_weight.gradient_norms) > 1.0
    assert one_pass.gradient_norms == pytest.approx(per_weight.gradient_norms, rel=1e-6)
    assert one_pass.losses == pytest.approx(per_weight.losses, rel=1e-6)


def test_zero3_on_one_rank_with_an_offloaded_optimizer_keeps_deepspeeds_step_and_gradient_path(one_process_group):
    """An offloaded optimizer (its state and step on the host) needs DeepSpeed's release around the step and its
    gradient path: only the fetch hooks go, and the run trains as the one with every change (the same losses, and
    gradients summed over an optimizer step)."""
    every_change = zero3_run(checkpointing=True, steps=4, partitioned=False)
    offloaded = zero3_run(checkpointing=True, steps=4, partitioned=False, offload_optimizer=True)
    assert len(every_change.one_rank_changes) == 4 and every_change.gradient_hooks == 0
    assert offloaded.one_rank_changes == every_change.one_rank_changes[:1] and offloaded.gradient_hooks > 0
    assert offloaded.losses == pytest.approx(every_change.losses, rel=1e-6)
    for name, gradient in every_change.accumulated.items():  # (offloaded, they reach the host at the step's end)
        assert gradient.norm() > 0
        torch.testing.assert_close(offloaded.accumulated[name], gradient, rtol=1e-6, atol=0)


class TwoBranches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x, branch):
        return getattr(self, branch)(x).square().mean()


def test_zero3_on_one_rank_counts_a_trained_weight_without_a_gradient_as_zero(one_process_group):
    """A trained weight that a micro-batch does not use has no gradient: its partition starts the optimizer step at
    zero (as DeepSpeed's layer hook zero-fills it), not at the last step's gradient."""
    from deepspeed.utils import safe_get_full_grad
    from launch.config import resolve
    cfg = resolve("llama_lora", ["deepspeed.config=zero3", "deepspeed.overrides={optimizer: {params: {torch_adam: true}}}"])
    torch.manual_seed(0)
    built = engine.DeepSpeedEngine(TwoBranches(), engine.sized_for_model(engine.deepspeed_config(cfg, 1), 8),
                                   cfg.train, 10)
    assert built.keeps_weights_gathered and len(built.one_rank_changes) == 4
    x = torch.randn(4, 8)
    gradients = []
    for branch in ("a", "a", "b", "b"):
        built.backward(built(x=x, branch=branch))
        gradients.append({name: safe_get_full_grad(p).clone() for name, p in built.module.named_parameters()})
        built.step()
    assert gradients[1]["a.weight"].norm() > 0 and gradients[1]["b.weight"].norm() == 0
    assert gradients[2]["a.weight"].norm() == 0 and gradients[2]["b.weight"].norm() > 0
    torch.testing.assert_close(gradients[3]["b.weight"], 2 * gradients[2]["b.weight"])
    assert gradients[3]["a.weight"].norm() == 0


@pytest.mark.parametrize("world_size,zero,expected", [
    (1, {}, engine.ONE_RANK_PERSISTENCE),
    (2, {}, 128 * 64),
    (1, {"offload_param": {"device": "cpu"}}, 128 * 64),
    (1, {"stage3_param_persistence_threshold": 0}, 0),
])
def test_zero3_persistence_threshold_follows_the_ranks(world_size, zero, expected):
    """Filled for one rank with no parameter offload; the width rule for several ranks or offloaded parameters;
    an explicit value is kept."""
    from launch.config import resolve
    overrides = "{zero_optimization: {%s}}" % ", ".join(f"{k}: {json.dumps(v)}" for k, v in zero.items())
    cfg = resolve("llama_lora", ["deepspeed.config=zero3", f"deepspeed.overrides={overrides}"])
    config = engine.deepspeed_config(cfg, world_size, 64)
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == expected


def test_srlora_under_one_rank_zero3_fuses_into_gathered_weights_as_into_partitioned_ones(one_process_group, tmp_path,
                                                                                         monkeypatch):
    """SRLoRA's recompositions write the fused pairs into the frozen base weights: on one rank, where every weight
    stays gathered, the whole run's losses equal those of a run with every weight partitioned; so do those of the
    path a GPU runs by default, with compiled decoder regions (here TorchDynamo's aot_eager), which cannot gather
    the weights each recomposition releases."""
    from launch.config import resolve
    from recipes import finetune
    monkeypatch.setattr(compiled_regions, "BACKEND", "aot_eager")
    losses = {}
    for name, persistence, compiled in (("gathered", "", "false"),
                                        ("partitioned", "stage3_param_persistence_threshold: 0", "false"),
                                        ("gathered compiled", "", "true")):
        out = tmp_path / name.replace(" ", "_")
        torch._dynamo.reset()
        cfg = resolve("llama_srlora", [*SMALL_RUN, "deepspeed.config=zero3", "train.max_steps=8",
                                       "train.warmup_steps=2", "train.save_every=0", "train.export_peft=false",
                                       "srlora.schedule=fixed", "srlora.start_step=3", "srlora.interval=2",
                                       "srlora.end_step=7", f"train.output_dir={out}", f"model.compile={compiled}",
                                       f"deepspeed.overrides={{zero_optimization: {{{persistence}}}}}"])
        finetune.run(cfg)
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [line["loss"] for line in lines if "loss" in line]
        assert sum("srlora" in line for line in lines) == 3
    assert len(losses["gathered"]) == 8 and losses["gathered"] == pytest.approx(losses["partitioned"], rel=1e-6)
    assert losses["gathered compiled"] == pytest.approx(losses["gathered"], rel=1e-5)


def test_one_rank_zero3_writes_the_merged_model_as_with_every_weight_partitioned(one_process_group, tmp_path):
    """train.save_merged=true writes the adapters into the frozen base weights at export. On one rank, where every
    weight stays gathered between steps, that write was refused as if a running forward held the weight: the
    merged model now equals the one written with every weight partitioned, and differs from a run that learned
    nothing (learning rate 1e-12: the adapters' product stays about zero, so its merged model is the base)."""
    from safetensors.torch import load_file
    from launch.config import resolve
    from recipes import finetune
    merged = {}
    for name, persistence, rate in (("gathered", "", 1e-2), ("partitioned", "stage3_param_persistence_threshold: 0", 1e-2),
                                    ("unlearned", "", 1e-12)):
        out = tmp_path / name
        cfg = resolve("llama_selora", [*SMALL_RUN, "deepspeed.config=zero3", "train.max_steps=3", "train.save_every=0",
                                       "train.export_peft=false", "train.save_merged=true", f"train.learning_rate={rate}",
                                       f"train.output_dir={out}",
                                       f"deepspeed.overrides={{zero_optimization: {{{persistence}}}}}"])
        finetune.run(cfg)
        merged[name] = load_file(str(out / "merged" / "model.safetensors"))
    assert merged["gathered"].keys() == merged["partitioned"].keys() == merged["unlearned"].keys()
    for key, tensor in merged["partitioned"].items():
        torch.testing.assert_close(merged["gathered"][key], tensor, rtol=1e-5, atol=1e-7)
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged["gathered"][query], merged["unlearned"][query], rtol=1e-4, atol=1e-6)


# ----- the fused loss under ZeRO-3 (the output weight read outside its layer) ------------------------------------

class GradientInForward(torch.autograd.Function):
    """`reference_loss` under liger's contract: the hidden states' gradient is computed in the forward and the
    backward only scales it, never reading the output weight (which ZeRO-3 has released again by then)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, num_items_in_batch):
        with torch.enable_grad():
            leaf = hidden.detach().requires_grad_()
            loss = reference_loss(leaf, weight.detach(), labels, num_items_in_batch)
            (gradient,) = torch.autograd.grad(loss, leaf)
        ctx.save_for_backward(gradient)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output):
        (gradient,) = ctx.saved_tensors
        return gradient * grad_output, None, None, None


def test_under_zero3_the_fused_loss_sees_the_output_weight_whole_and_trains_as_the_logits(
        tmp_path, monkeypatch, one_process_group):
    """ZeRO-3 with every weight partitioned (as on several ranks): the fused route reads the output weight outside
    its layer's forward, DeepSpeed gathers it for the loss and leaves it released after the step; the losses equal
    those of the logits path under the same engine, and so do those of one rank's default, where every weight stays
    gathered."""
    from launch.config import resolve
    seen = []

    def loss(hidden, weight, labels, num_items_in_batch):
        seen.append(weight.numel())
        return GradientInForward.apply(hidden, weight, labels, num_items_in_batch)  # as liger: no weight after

    monkeypatch.setattr(fused_loss, "LOSS", loss)
    choice = validation.fused_loss_choice
    monkeypatch.setattr(validation, "fused_loss_choice", lambda setting, device, stage: choice(setting, CUDA, stage))
    monkeypatch.setattr(fused_loss, "liger_available", lambda: None)
    runs, heads = {}, {}
    zero3 = "deepspeed.config=zero3"
    partitioned = ("deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}, "
                   "optimizer: {params: {torch_adam: true}}}")
    for name, extra in (("logits", ["model.fused_loss=false", zero3, partitioned]),
                        ("partitioned", ["model.fused_loss=true", zero3, partitioned]),
                        ("gathered", ["model.fused_loss=true", zero3,
                                      "deepspeed.overrides={optimizer: {params: {torch_adam: true}}}"])):
        out = tmp_path / name
        seen.clear()
        setup = {}
        monkeypatch.setattr(finetune, "use_fused_loss", lambda model, *args, **kwargs: setup.update(model=model)
                            or use_fused_loss(model, *args, **kwargs))
        finetune.run(resolve("llama_lora", SMALL_RUN + [
            "train.max_steps=3", "train.save_every=0", "train.gradient_accumulation_steps=2",
            "train.micro_batch_size=2", "data.padding_free=true", "train.export_peft=false",
            "train.learning_rate=1e-2", f"train.output_dir={out}", *extra]))
        runs[name] = losses(out)
        if name != "logits":
            heads[name] = (set(seen), setup["model"].lm_head.weight.numel())
    vocab, hidden = 4096, 128
    assert heads["partitioned"] == ({vocab * hidden}, 0)  # whole inside the loss, released after it
    assert heads["gathered"] == ({vocab * hidden}, vocab * hidden)
    assert len(runs["logits"]) == 3 and runs["logits"][-1] < runs["logits"][0]
    assert runs["partitioned"] == pytest.approx(runs["logits"], rel=1e-5, abs=1e-6)
    assert runs["gathered"] == pytest.approx(runs["logits"], rel=1e-5, abs=1e-6)
