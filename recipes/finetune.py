"""Instruction fine-tuning with SeLoRA / LoRA adapters (and optionally SRLoRA), plain PyTorch or DeepSpeed.

Read `run` top to bottom, four steps: `set_up` checks the config once into a plan (recipes/validate.py) and the
output directory (recipes/resume.py), starts the process group and builds the data; `build` loads the model, gives
it adapters, builds the engine and resumes a checkpoint if there is one; `train_loop` runs the optimizer steps;
`export` writes the adapter.

    python launch/train.py --recipe llama_selora train.max_steps=100
    deepspeed launch/train.py --recipe llama_srlora deepspeed.config=zero3
"""
from __future__ import annotations

import gc
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import selora
from recipes import checkpoint, engine as engines, resume
from recipes.best_eval import BestEval
from recipes.checkpoint import TrainerState
from recipes.data import IGNORE_INDEX, make_collate_fn
from recipes.data_prepare import build_datasets
from recipes.compiled_regions import compile_regions
from recipes.fused_loss import use_fused_loss
from recipes.inference import answer_prompts, base_model_record, format_comparison
from recipes.metrics import MetricsLogger, PhaseTimer
from recipes.profiling import StepProfiler
from recipes.modeling import check_quantization_backend, check_target_modules, load_model, load_tokenizer
from recipes.packed_attention import fit_to_model, use_attention
from recipes.run_record import write_run_record
from recipes.stop_request import STOP_FILE_ENV, StopRequest, Stopped, uninstalled_after
from recipes.trackers import report_to
from recipes.validate import RunPlan, check_srlora_schedule, launched, validate
from selora.distributed import is_partitioned, world


@uninstalled_after  # the stop signals' handlers are undone however run ends
def run(cfg) -> dict:
    """Train as ``cfg`` says; returns {"step", "loss", "eval_loss", "best_step", "outputs": {kind: path}}."""
    setup = set_up(cfg)  # checks, resume plan, process group, stop request, data: no weights yet
    trainee = build(cfg, setup)  # model, adapters, SRLoRA, engine, the state training starts from
    samples = sample_base_answers(cfg, setup, trainee)  # what the base answers to train.sample_prompts
    last = train_loop(cfg, setup, trainee)
    return export(cfg, setup, trainee, last, samples)


# ----- setup: the plan, this process, the data ----------------------------------------------------------------
@dataclass
class TrainingData:
    """What `prepare_data` built: the tokenizer, the data sets and this rank's order of micro-batches."""
    tokenizer: Any
    train_ds: Any
    eval_ds: Any  # None without eval data
    collate: Callable
    order: DataOrder
    total_steps: int  # optimizer steps of the whole run


@dataclass
class Setup:
    """What `set_up` prepared before any weights load."""
    plan: RunPlan  # what validate resolved from the config, once
    settings: dict  # what a checkpoint records and a resume must match (resume.run_settings)
    resume_from: Path | None  # the checkpoint to resume, None for a fresh start
    rank: int
    world_size: int
    stop: StopRequest
    data: TrainingData

    @property
    def device(self) -> torch.device:
        return self.plan.device

    def say(self, *args, **kwargs) -> None:
        """print, on rank 0 only."""
        if self.rank == 0:
            print(*args, **kwargs)


def set_up(cfg) -> Setup:
    """Every check that needs no data or weights first, so a bad value fails in a second, before anything is read,
    loaded or written; then the process group, the stop request and the data."""
    train = cfg.train
    plan = validate(cfg)
    settings = resume.run_settings(cfg)
    resume_from = resume.plan_resume(cfg, total_steps=int(train.max_steps) or None, settings=settings)

    seed_everything(train.seed)
    rank, world_size = setup_distributed(cfg, plan.device)
    if world_size != plan.world_size:  # a group started before the run: the plan's DeepSpeed batch would be off
        raise RuntimeError(f"torch.distributed has {world_size} processes but RANK/WORLD_SIZE say {plan.world_size}")
    engines.check_world_size(cfg, world_size)
    check_quantization_backend(plan.precision.quantization, plan.device)  # a 4/8-bit recipe this machine cannot run
    check_target_modules(cfg.model, list(cfg.adapter.target_modules))  # Phi-3's fused projections' names
    # A signal (or the batch script's stop file) from here on stops the run after an optimizer step, not mid-way.
    stop = StopRequest(list(train.stop_signals), float(train.stop_grace_s), os.environ.get(STOP_FILE_ENV), rank,
                       plan.device).install()
    data = prepare_data(cfg, plan, resume_from, rank, world_size)
    return Setup(plan, settings, resume_from, rank, world_size, stop, data)


def prepare_data(cfg, plan: RunPlan, resume_from: Path | None, rank: int, world_size: int) -> TrainingData:
    """Tokenizer, data sets, collate and this rank's order of micro-batches. Data before the model: bad data fails
    in seconds, not after loading billions of weights. An epochs-based run learns its length here."""
    train = cfg.train
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    train_ds, eval_ds = build_datasets(cfg.data, tokenizer, train.seed, int(train.micro_batch_size))
    collate = make_collate_fn(tokenizer.pad_token_id, plan.pad_multiple, int(cfg.data.max_length),
                              padding_free=bool(cfg.data.padding_free))
    # Padding-free: one packed row of micro_batch_size x max_length tokens is the micro-batch.
    rows_per_micro_batch = 1 if cfg.data.padding_free else int(train.micro_batch_size)
    order = DataOrder(len(train_ds), rows_per_micro_batch, rank, world_size, int(train.seed))
    total_steps = total_optimizer_steps(train, order.batches_per_epoch)
    if rank == 0:
        print(f"{len(train_ds)} training examples, {order.batches_per_epoch} micro-batches per epoch per rank, "
              f"{total_steps} optimizer steps")
    if not train.max_steps:  # an epochs-based run knows its length only now, still before the model loads
        if plan.srlora is not None:
            check_srlora_schedule(plan.srlora, plan.adapter, total_steps)
        resume.check_steps_left(resume_from, None, total_steps)
    return TrainingData(tokenizer, train_ds, eval_ds, collate, order, total_steps)


# ----- build: model, adapters, engine, the starting state -----------------------------------------------------
@dataclass
class Trainee:
    """What `build` made: the adapted model, its SRLoRA (or None), the engine, and the state training starts from."""
    model: torch.nn.Module
    model_info: dict
    srlora: Any
    engine: Any
    state: TrainerState


def build(cfg, setup: Setup) -> Trainee:
    """The base model, its adapters and SRLoRA, the engine over them, and the state training starts from."""
    plan, total_steps = setup.plan, setup.data.total_steps
    model, model_info = load_base_model(cfg, setup)
    selora.apply(model, plan.adapter)
    setup.say(selora.parameter_table(model))
    srlora = None
    if plan.srlora is not None:
        from selora.srlora import SRLoRA

        srlora = SRLoRA(model, plan.srlora, total_steps=total_steps)  # makes a "paper" schedule concrete
        setup.say(f"SRLoRA: {srlora.config.pairs_per_recomposition} pairs per layer at steps {srlora.schedule}")
    engine = engines.build_engine(model, cfg, total_steps, plan.deepspeed, plan.precision.loss_scaling)
    if getattr(engine, "fetch_units", None):
        setup.say(f"ZeRO-3 gathers each {' and '.join(engine.fetch_units)} whole (one gather per layer)")
    if getattr(engine, "keeps_weights_gathered", False):
        changes = "".join(f"; {change}" for change in engine.one_rank_changes)
        setup.say("ZeRO-3 on one rank keeps every weight gathered (its partition is the whole model: no memory "
                  f"saved by releasing){changes}; set zero_optimization.stage3_param_persistence_threshold to "
                  "partition anyway")
    if plan.compiled:
        compile_regions(model)
    setup.say(plan.compile_line)
    fused_loss_line = plan.fused_loss_line
    if plan.fused_loss:
        fused_loss_line = use_fused_loss(model, fused_loss_line, required=str(cfg.model.fused_loss).lower() == "true")
    setup.say(fused_loss_line)
    state = start_state(cfg, setup, engine, model, srlora)
    return Trainee(model, model_info, srlora, engine, state)


def load_base_model(cfg, setup: Setup) -> tuple[torch.nn.Module, dict]:
    """The base model in the plan's precision (born sharded under ZeRO-3's init context), attending with the
    plan's attention as far as its family allows."""
    plan = setup.plan
    init_context = engines.zero3_init_context(cfg, plan.deepspeed)
    model, model_info = load_model(cfg.model, plan.device, init_context=init_context, precision=plan.precision)
    use_attention(model, fit_to_model(model, cfg.model.attention, plan.attention, int(cfg.data.max_length)))
    return model, model_info


def start_state(cfg, setup: Setup, engine, model, srlora) -> TrainerState:
    """Resume (engine, adapter, SRLoRA, RNG and data position exactly as the checkpoint left them) or start fresh;
    then the run's record (config.yaml, run_info.json)."""
    output_dir = Path(cfg.train.output_dir)
    state = TrainerState(world_size=setup.world_size)
    if setup.resume_from is not None:
        state = checkpoint.load_checkpoint(setup.resume_from, engine, model, srlora)
        setup.say(f"resumed from {setup.resume_from} at step {state.step}")
    elif cfg.train.overwrite:  # the user asked to replace a previous run: only now, when training really starts
        resume.clear_previous_run(output_dir)
    write_run_record(output_dir, cfg, setup.rank, setup.world_size, resumed_from=setup.resume_from)
    return state


@dataclass
class SampleAnswers:
    prompts: list  # train.sample_prompts, [] when none (or under ZeRO-3)
    base: list | None  # the base model's answers (None when the run resumed: they were shown at its start)


def sample_base_answers(cfg, setup: Setup, trainee: Trainee) -> SampleAnswers:
    """What the base model answers to train.sample_prompts (the adapter starts as a no-op), shown again at the end."""
    prompts = list(cfg.train.sample_prompts or [])
    if prompts and any(is_partitioned(p) for p in trainee.model.parameters()):
        # Generation needs whole weights on every rank; ZeRO-3's are sharded (and a generate left parameters
        # in flight that the final export then could not gather).
        setup.say("train.sample_prompts skipped under ZeRO-3 (the weights are sharded); try the prompts on the "
                  "saved adapter with launch/generate.py")
        prompts = []
    base = None
    if prompts and trainee.state.step == 0:
        base = answer_prompts(trainee.model, setup.data.tokenizer, prompts, synced_gpus=setup.world_size > 1)
    return SampleAnswers(prompts, base)


# ----- the loop -----------------------------------------------------------------------------------------------
def train_loop(cfg, setup: Setup, trainee: Trainee) -> dict:
    """Micro-batches in a seeded order, an optimizer step every engine.accumulation of them, logs, evaluations
    and checkpoints as cfg.train says, until the last step, an early stop or a stop request (which raises
    `Stopped` after this step's checkpoint). Returns {"loss", "eval_loss"}: the last logged values."""
    train, data, device = cfg.train, setup.data, setup.device
    engine, model, srlora, state = trainee.engine, trainee.model, trainee.srlora, trainee.state
    output_dir, total_steps, stop = Path(train.output_dir), data.total_steps, setup.stop
    best = BestEval(output_dir, train.early_stopping_patience, train.early_stopping_min_delta, bool(train.export_best),
                    state)
    reports = report_to(train)
    metrics = MetricsLogger(output_dir, setup.rank, "tensorboard" in reports, resume_step=state.step,
                            trackers=tuple(name for name in reports if name != "tensorboard"),
                            config=OmegaConf.to_container(cfg, resolve=True))
    progress = tqdm(total=total_steps, initial=state.step, disable=setup.rank != 0, desc="train", dynamic_ncols=True)
    window = LogWindow(device)
    timer = PhaseTimer(device, enabled=bool(train.time_breakdown))
    profiler = StepProfiler(train.profile_steps, output_dir, device, setup.rank, python=bool(train.profile_python))
    last = {"loss": None, "eval_loss": None}
    engine.train()
    batches = data.order.micro_batches(data.train_ds, data.collate, state.epoch, state.batch_in_epoch)
    # Everything built so far (model, data, tokenizer) lives for the whole run: moved out of the garbage
    # collector's sight, the collections that the step's short-lived objects trigger stop re-scanning it.
    gc.collect()
    gc.freeze()
    stopped = stop.agreed()  # asked while loading: stop before the first step
    try:
        while state.step < total_steps and not stopped and not best.should_stop(state):
            profiler.before_step(state.step + 1)
            # The whole step's micro-batches first: its loss is normalised by all of their learned tokens.
            taken = [next(batches) for _ in range(engine.accumulation)]
            state.epoch, state.batch_in_epoch = taken[-1][:2]  # the position after the step: where a resume starts
            lr = optimizer_step(engine, [batch for _, _, batch in taken], device, window, timer)
            state.step += 1
            window.end_step()
            progress.update(1)
            step = state.step
            events = srlora.step(step, engine.optimizer) if srlora is not None else []
            timer.lap("srlora")

            line = {}
            if (train.log_every and step % train.log_every == 0) or step == total_steps:
                line.update(window.reduce(), lr=lr)
                if not math.isfinite(line["loss"]):
                    metrics.log(step, **line)
                    raise TrainingDiverged(step, line["loss"], lr, output_dir)
                last["loss"] = line["loss"]
                progress.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{line['tokens_per_s']:.0f}",
                                     refresh=False)  # drawn with the next update (tqdm's own rate), not every line
                if timer.enabled:
                    line["time_breakdown"] = timer.reduce()
            evaluate_now = train.eval_every and (step % train.eval_every == 0 or step == total_steps)
            if data.eval_ds is not None and len(data.eval_ds) and evaluate_now:
                eval_loss = evaluate(engine, data.eval_ds, data.collate, int(train.micro_batch_size), device)
                line["eval_loss"] = last["eval_loss"] = eval_loss
                best.record(state, eval_loss, model, srlora)  # early stopping's count; export_best's adapter
                engine.train()
            if events:
                line["srlora"] = events
            if line:
                metrics.log(step, **line)
            stopping = best.should_stop(state)
            if train.save_every and (step % train.save_every == 0 or step == total_steps or stopping):
                if not window.finite():  # steps not logged yet: a diverged state is never saved over a good one
                    raise TrainingDiverged(step, float("nan"), lr, output_dir)
                checkpoint.save_checkpoint(output_dir, engine, model, srlora, state, settings=setup.settings)
                best.checkpointed(state)
            timer.lap("log")
            profiler.after_step(step)
            stopped = stop.agreed()  # one small collective: every rank stops after the same step
    except TrainingDiverged:
        raise
    except Exception as error:  # e.g. a collective that failed because another rank died or stopped answering
        first_line = (str(error).splitlines() or [""])[0].split(". ")[0][:200]
        print(f"rank {setup.rank}: failed after optimizer step {state.step} ({type(error).__name__}: {first_line}); "
              f"checkpoints/latest in {output_dir} still names the last complete checkpoint", file=sys.stderr,
              flush=True)
        raise
    finally:
        gc.unfreeze()  # also when the loop raises: an in-process caller (a test) gets its collector back
        progress.close()  # and an error message starts on a line of its own
    metrics.close()
    if stopped and state.step < total_steps and not best.should_stop(state):
        if not window.finite():  # a stop's checkpoint, too, is never a diverged state
            raise TrainingDiverged(state.step, float("nan"), engine.current_lr(), output_dir)
        raise stop_at_step_boundary(output_dir, engine, model, srlora, state, setup.settings, total_steps, stop)
    if best.should_stop(state):
        setup.say(f"early stopping at step {state.step}: {state.evals_without_improvement} evaluations without an "
                  f"improvement over the best eval loss {state.best_eval_loss:.4f} (step {state.best_step})")
    if best.restore(state, model, srlora) is not None:
        setup.say(f"exporting the best evaluation's adapter: step {state.best_step}, eval loss "
                  f"{state.best_eval_loss:.4f}")
    return last


# ----- export -------------------------------------------------------------------------------------------------
def export(cfg, setup: Setup, trainee: Trainee, last: dict, samples: SampleAnswers) -> dict:
    """Selora adapter, PEFT LoRA, merged model (all ranks call; rank 0 writes); the sample prompts' answers before
    and after. Returns run's result."""
    train, model, state, tokenizer = cfg.train, trainee.model, trainee.state, setup.data.tokenizer
    outputs = checkpoint.export_final(Path(train.output_dir), trainee.engine, model, trainee.srlora,
                                      export_peft=bool(train.export_peft), save_merged=bool(train.save_merged),
                                      base_model_name_or_path=base_model_name(cfg, trainee.model_info),
                                      tokenizer=tokenizer, base_model=base_model_record(cfg.model))
    if samples.prompts:
        tuned_answers = answer_prompts(model, tokenizer, samples.prompts, synced_gpus=setup.world_size > 1)
        setup.say(format_comparison(samples.prompts, samples.base, tuned_answers))
    for kind, path in outputs.items():
        setup.say(f"{kind} saved to {path}")
    return {"step": state.step, **last, "best_step": state.best_step, "outputs": outputs}


def stop_at_step_boundary(output_dir, engine, model, srlora, state, settings, total_steps: int,
                          stop: StopRequest) -> Stopped:
    """Every rank: write this step's checkpoint (unless the periodic save just did); the `Stopped` to raise."""
    latest = checkpoint.read_pointer(checkpoint.checkpoints_dir(output_dir))
    if state.step and (latest is None or latest.name != f"step_{state.step}"):
        latest = checkpoint.save_checkpoint(output_dir, engine, model, srlora, state, settings=settings)
    return Stopped(state.step, total_steps, latest if state.step else None, stop.reason)


# ----- configs ------------------------------------------------------------------------------------------------
def total_optimizer_steps(train, batches_per_epoch: int) -> int:
    """train.max_steps when set (> 0), else train.epochs over the data."""
    if train.max_steps is not None and int(train.max_steps) > 0:
        return int(train.max_steps)
    return max(1, math.ceil(train.epochs * batches_per_epoch / int(train.gradient_accumulation_steps)))


def base_model_name(cfg, model_info) -> str | None:
    """What the PEFT export records as its base (a hub id or a local path), when the model came from one."""
    if isinstance(model_info, dict) and model_info.get("name_or_path"):
        return str(model_info["name_or_path"])
    for key in ("name_or_path", "pretrained", "path"):
        value = cfg.model.get(key) if hasattr(cfg.model, "get") else None
        if value:
            return str(value)
    return None


# ----- process setup ------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def setup_distributed(cfg, device: torch.device) -> tuple[int, int]:
    """(rank, world_size); ``device`` (the plan's) becomes the current CUDA device. torch.distributed is started only
    under a launcher (RANK/WORLD_SIZE set), or as a one-process group when a DeepSpeed config is asked for without
    one (DeepSpeed needs a group)."""
    started_by_launcher = launched()
    if started_by_launcher or engines.uses_deepspeed(cfg):
        if not started_by_launcher:
            own = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
            os.environ.update(own, **{OWN_GROUP_ENV: ",".join(own)})
        deepspeed = engines.import_deepspeed()

        # A collective that waits longer than this (a rank died or hangs) raises on every rank still waiting.
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   timeout=timedelta(seconds=float(cfg.train.collective_timeout_s)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return world()


OWN_GROUP_ENV = "SELORA_OWN_PROCESS_GROUP"  # the launcher variables setup_distributed set itself, comma-separated


def leave_process_group() -> None:
    """Destroy this process's group, if any, before the interpreter exits: gloo's worker threads still alive at
    interpreter shutdown abort the process ("terminate called without an active exception", exit -6) at random,
    turning a finished run into a failed one (pytorch/pytorch#190489). A one-process group `setup_distributed`
    made for itself also takes back the launcher variables it set, so a later run in this process starts afresh."""
    if dist.is_initialized():
        dist.destroy_process_group()
    for name in filter(None, os.environ.pop(OWN_GROUP_ENV, "").split(",")):
        os.environ.pop(name, None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----- data order ---------------------------------------------------------------------------------------------
class DataOrder:
    """This rank's micro-batches of each epoch: DistributedSampler's seeded shuffle (set_epoch), cut into
    micro-batches (the last one may be short). A position (epoch, batch_in_epoch) names the next micro-batch,
    so a resumed run continues with exactly the micro-batch the interrupted one would have taken."""

    def __init__(self, size: int, micro_batch_size: int, rank: int, world_size: int, seed: int):
        if size == 0:
            raise ValueError("the training set is empty: check data.* (paths, filters, max length)")
        self.size, self.micro, self.rank, self.world_size, self.seed = size, micro_batch_size, rank, world_size, seed
        self.batches_per_epoch = math.ceil(math.ceil(size / world_size) / micro_batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        sampler = DistributedSampler(range(self.size), num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=False)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        return [indices[i:i + self.micro] for i in range(0, len(indices), self.micro)]

    def micro_batches(self, dataset, collate, epoch: int, start: int):
        """Endless (epoch, position after this batch, batch) from ``(epoch, start)`` on."""
        while True:
            batches = self.batches(epoch)
            # A private generator: creating the iterator must not draw from the global RNG, or a resumed run's
            # dropout stream would be one draw off the uninterrupted one's.
            loader = DataLoader(dataset, batch_sampler=batches[start:], collate_fn=collate,
                                generator=torch.Generator().manual_seed(self.seed + epoch),
                                pin_memory=torch.cuda.is_available())  # lets the copy to the GPU overlap
            for position, batch in enumerate(loader, start + 1):
                yield (epoch, position, batch) if position < len(batches) else (epoch + 1, 0, batch)
            epoch, start = epoch + 1, 0


# ----- logging and evaluation ---------------------------------------------------------------------------------
def model_inputs(batch: dict) -> dict:
    """What the model is called with: token ids, labels and, for packed or padding-free batches, the positions
    that restart at every example (from which transformers keeps attention inside each example); no attention
    mask. Batches are right-padded and attention is causal, so no real token ever attends to a pad; pads' own
    outputs carry label -100. Without a mask, SDPA takes its causal flash path instead of materialising a
    (batch, 1, seq, seq) mask per forward (on an H100 that mask path cost about 3 ms of host time per attention
    call at the 1.3B bench shape). ``use_cache=False``: a training forward keeps no key/value cache (with one,
    transformers would also stop reading example boundaries from the positions)."""
    inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "use_cache": False}
    for key in BOUNDARY_KEYS:
        if key in batch:
            inputs[key] = batch[key]
    return inputs


def step_targets(micro_batches: list[dict], device: torch.device) -> torch.Tensor:
    """The optimizer step's learned tokens (labels other than -100 after the model's one-position shift) over its
    micro-batches and every rank: one all_reduce of one number per step. At least 1, so a step without any gives
    a loss and gradients of 0, not nan."""
    count = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in micro_batches)
    total = torch.tensor(float(count), device=device)
    if world()[1] > 1:
        dist.all_reduce(total)
    return total.clamp_(min=1.0)


def optimizer_step(engine, micro_batches: list[dict], device: torch.device, window: LogWindow, timer) -> float:
    """Forward and backward of the step's micro-batches, then the optimizer step; returns the lr it used.

    Each micro-batch's loss is its summed token loss / the step's learned tokens on all ranks (transformers'
    num_items_in_batch), so the micro-batches' and ranks' gradients add up to the gradient of the step's mean token
    loss: the same for any split of the same examples into micro-batches, accumulation steps and ranks (a mean of
    micro-batch means would weigh a short answer's tokens more)."""
    if len(micro_batches) != engine.accumulation:
        raise ValueError(f"{len(micro_batches)} micro-batches for a step of {engine.accumulation}")
    targets = step_targets(micro_batches, device)
    for batch in micro_batches:
        batch = to_device(batch, device)
        timer.lap("data")
        loss = engine(**model_inputs(batch), num_items_in_batch=targets).loss
        timer.lap("forward")
        engine.backward(loss)
        timer.lap("backward")
        lr = engine.current_lr()
        window.add_micro_batch(loss, batch["attention_mask"])
        stepped = engine.step()
        timer.lap("optimizer")
    assert stepped, "the engine's accumulation boundary is not the step's last micro-batch"
    return lr


# What packed and padding-free batches add: restarting positions, and (padding-free) the examples' boundaries
# that recipes/packed_attention.py's varlen attention reads (transformers passes them through to attention).
BOUNDARY_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``; the boundary lengths (plain ints) as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class TrainingDiverged(RuntimeError):
    """The training loss stopped being a number. The engines take every step as it comes (no skipped steps, as in
    a plain PyTorch loop; DeepSpeed's bf16 overflow check is off in configs/deepspeed; only float16's loss scaling
    skips a step whose scaled gradients overflowed), so the run stops here, before a checkpoint of the diverged
    state is written."""

    def __init__(self, step: int, loss: float, lr: float, output_dir):
        super().__init__(
            f"step {step}: the training loss is {loss} (training diverged); nothing from this point was saved, "
            f"the checkpoints in {output_dir}/checkpoints are from before it. Lower train.learning_rate (now {lr:.3g}), keep "
            "train.max_grad_norm set, or look for broken records in the data; then rerun: train.resume=auto "
            "continues from the last checkpoint")


class LogWindow:
    """Loss and tokens since the last log line; reduced over ranks only when a line is written."""

    def __init__(self, device: torch.device):
        self.device = device
        self.step_loss = torch.zeros((), device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0
        self.tokens = torch.zeros((), device=device)  # real (non-pad) tokens
        self.slots = 0  # token positions computed, pads included
        self.started = time.perf_counter()

    def add_micro_batch(self, loss: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """``loss``: the micro-batch's share of its step's loss (its summed token loss / the step's learned tokens
        on all ranks)."""
        self.step_loss += loss.detach().float()
        self.tokens += attention_mask.sum()
        self.slots += attention_mask.numel()

    def end_step(self) -> None:
        self.loss_sum += self.step_loss  # this rank's part of the step's token-mean loss (`reduce` sums the ranks')
        self.steps += 1
        self.step_loss.zero_()

    def finite(self) -> bool:
        """Whether every step's loss since the last `reduce` is finite, on every rank (a collective)."""
        flag = torch.isfinite(self.loss_sum).float()
        if world()[1] > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def reduce(self) -> dict:
        """Since the last call, over all ranks: the mean of the steps' losses (each the mean over the step's learned
        tokens on all ranks), real tokens per second, real tokens per optimizer step, and the share of computed
        positions that were padding."""
        totals = torch.stack([self.loss_sum, self.tokens.float(), torch.tensor(float(self.slots), device=self.device)])
        if world()[1] > 1:
            dist.all_reduce(totals)
        loss, tokens, slots = totals.tolist()
        elapsed = time.perf_counter() - self.started
        result = {"loss": loss / self.steps, "tokens_per_s": tokens / max(elapsed, 1e-9),
                  "tokens": tokens / self.steps, "padding_share": 1.0 - tokens / max(slots, 1.0)}
        if self.device.type == "cuda":  # this rank's high-water mark since the start (what an out-of-memory meets)
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.loss_sum.zero_()
        self.tokens.zero_()
        self.slots = 0
        self.steps = 0
        self.started = time.perf_counter()
        return result


@torch.no_grad()
def evaluate(engine, eval_ds, collate, micro_batch_size: int, device: torch.device) -> float:
    """Mean loss per target token over the whole eval set, all ranks together.

    Ranks take every world_size-th example; a rank that runs out early still runs forwards (weight 0) so
    that ZeRO-3's collective parameter gathering stays in step on every rank."""
    rank, world_size = world()
    shard = list(range(rank, len(eval_ds), world_size))
    count = math.ceil(math.ceil(len(eval_ds) / world_size) / micro_batch_size)
    batches = [shard[i * micro_batch_size:(i + 1) * micro_batch_size] or [0] for i in range(count)]
    weights = [1.0 if shard[i * micro_batch_size:(i + 1) * micro_batch_size] else 0.0 for i in range(count)]
    engine.eval()
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    for weight, batch in zip(weights, DataLoader(eval_ds, batch_sampler=batches, collate_fn=collate)):
        batch = to_device(batch, device)
        loss = engine(**model_inputs(batch)).loss
        targets = (batch["labels"][:, 1:] != -100).sum()  # the model shifts labels by one
        if weight and targets > 0:
            totals += torch.stack([loss.double() * targets, targets.double()])
    if world_size > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
