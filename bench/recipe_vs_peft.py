"""The whole recipe against the two loops our users would otherwise run, in one process per row, same GPU:

- the plain PEFT loop: transformers LlamaForCausalLM + PEFT LoRA on the seven projections, fused torch AdamW,
  gradient clipping, random tokens of the recipe's batch shape (the floor a hand-written loop gets);
- HF ``Trainer`` + PEFT (the path LLaMA-Factory and axolotl users run), same model, batch and optimizer;
- selora's recipe through its own entry point (``launch/train.py``): plain engine, ZeRO-2 and ZeRO-3 on one GPU;
  LoRA, SeLoRA (the library's default basis) and SRLoRA (recomposing every ``--srlora-interval`` steps); bf16
  and 4-bit bases.

All models have random weights of a preset's shape (nothing can be downloaded). Tokens/s counts real (non-pad)
tokens; the recipe's rows come from packed instruction data, so their padding share is reported too. A row's
throughput is the median over its timed steps (after ``--warmup`` steps); SRLoRA's is amortised: the median step
after a recomposition at the first timed step, plus that step's extra time divided by the interval.

    python bench/recipe_vs_peft.py --shape llama_1b_bench --batch 8 --seq 256          # one GPU call per scale
    python bench/recipe_vs_peft.py --shape llama2_7b --batch 4 --seq 1024 --rows core
    python bench/recipe_vs_peft.py --smoke --rows 'recipe plain LoRA'                  # CPU, tiny (tests/test_bench.py)

Rows go to docs/benchmarks/recipe_vs_peft_<date>.{json,md} ({"date", "device", "commit", "rows": [...]}; rows of
other shapes run the same day are kept, this shape's are replaced), rewritten after every row; ``--budget`` stops starting rows after
that many seconds, so a call never runs into its time limit with nothing written.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, argument_parser, median_range, pick_device, write_results

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# DeepSpeed's FusedAdam needs a JIT build on the GPU machine; torch's own Adam keeps the comparison about the loop.
TORCH_ADAM = "deepspeed.overrides={optimizer: {params: {torch_adam: true, adam_w_mode: true}}}"


def zero_overrides(**zero) -> str:
    """TORCH_ADAM plus these zero_optimization settings, as one deepspeed.overrides argument."""
    settings = ", ".join(f"{key}: {str(value).lower() if isinstance(value, bool) else value}"
                         for key, value in zero.items())
    return TORCH_ADAM[:-1] + ", zero_optimization: {" + settings + "}}"


# (row name, engine, method, recipe, extra overrides, core); "core" rows are the ones the targets are stated for.
# Padded rows are packed; padding-free rows (data.padding_free) put each micro-batch in one flat row, the
# examples kept apart by varlen flash attention on a GPU.
PF = "data.padding_free=true"
EAGER, COMPILED = "model.compile=false", "model.compile=true"  # model.compile=auto compiles on a GPU's plain/ZeRO-2
UNFUSED = "model.fused_loss=false"
RECIPE_ROWS = [
    ("recipe plain LoRA", "plain", "lora", "llama_lora", [], True),
    ("recipe plain SeLoRA", "plain", "selora", "llama_selora", [], True),
    ("recipe plain SRLoRA", "plain", "srlora", "llama_srlora", [], True),
    ("recipe ZeRO-2 LoRA", "zero2", "lora", "llama_lora", [], True),
    ("recipe ZeRO-2 SeLoRA", "zero2", "selora", "llama_selora", [], False),
    ("recipe ZeRO-3 LoRA", "zero3", "lora", "llama_lora", [], True),
    ("recipe ZeRO-3 SeLoRA", "zero3", "selora", "llama_selora", [], False),
    ("recipe plain LoRA (padding-free)", "plain", "lora", "llama_lora", [PF], False),
    ("recipe plain SeLoRA (padding-free)", "plain", "selora", "llama_selora", [PF], False),
    ("recipe plain SRLoRA (padding-free)", "plain", "srlora", "llama_srlora", [PF], False),
    # without the recipe's PiSSA start, whose full SVDs of 224 weights take minutes at 7B (the step does not
    # depend on the start)
    ("recipe plain SRLoRA (padding-free default start)", "plain", "srlora", "llama_srlora",
     [PF, "adapter.init=default"], False),
    ("recipe ZeRO-2 LoRA (padding-free)", "zero2", "lora", "llama_lora", [PF], False),
    # zero2.json's contiguous_gradients=false against DeepSpeed's default (each gradient copied into one buffer)
    ("recipe ZeRO-2 LoRA (padding-free contiguous gradients)", "zero2", "lora", "llama_lora",
     [PF, zero_overrides(contiguous_gradients=True)], False),
    ("recipe ZeRO-3 LoRA (padding-free)", "zero3", "lora", "llama_lora", [PF], False),
    ("recipe ZeRO-3 LoRA (padding-free compiled)", "zero3", "lora", "llama_lora", [PF, COMPILED], False),
    # every base matrix released after its layer and gathered again, as on several ranks (DeepSpeed's default
    # persistence threshold), against one rank's default of keeping every weight gathered
    ("recipe ZeRO-3 LoRA (padding-free partitioned)", "zero3", "lora", "llama_lora",
     [PF, zero_overrides(stage3_param_persistence_threshold=100000)], False),
    # every weight kept gathered as on one rank by default, but through a threshold the engine does not recognise
    # as its own, so that DeepSpeed's own path stays: per-layer fetch and release hooks, the release and re-gather
    # of every weight around each optimizer step, per-weight gradient hooks, buckets and reduce-scatters, and the
    # per-weight clipping norm (the engine's behaviour before recipes/zero3_one_rank.py)
    ("recipe ZeRO-3 LoRA (padding-free fetch hooks)", "zero3", "lora", "llama_lora",
     [PF, zero_overrides(stage3_param_persistence_threshold=10**15)], False),
    # ZeRO-3's settings weighed on one GPU: no prefetch of the next layers (no trace of the fetch order kept),
    # gradients reduced on the compute stream, each adapter gradient left where autograd put it (as zero2.json)
    ("recipe ZeRO-3 LoRA (padding-free no prefetch)", "zero3", "lora", "llama_lora",
     [PF, zero_overrides(stage3_prefetch_bucket_size=0)], False),
    ("recipe ZeRO-3 LoRA (padding-free no overlap)", "zero3", "lora", "llama_lora",
     [PF, zero_overrides(overlap_comm=False)], False),
    ("recipe ZeRO-3 LoRA (padding-free separate gradients)", "zero3", "lora", "llama_lora",
     [PF, zero_overrides(contiguous_gradients=False)], False),
    ("recipe plain LoRA (padding-free eager)", "plain", "lora", "llama_lora", [PF, EAGER], False),
    ("recipe plain SeLoRA (padding-free eager)", "plain", "selora", "llama_selora", [PF, EAGER], False),
    ("recipe ZeRO-2 LoRA (padding-free eager)", "zero2", "lora", "llama_lora", [PF, EAGER], False),
    # model.fused_loss=auto fuses the output layer and the loss on a GPU with liger-kernel: these keep the logits
    ("recipe plain LoRA (padding-free logits)", "plain", "lora", "llama_lora", [PF, UNFUSED], False),
    ("recipe plain SeLoRA (padding-free logits)", "plain", "selora", "llama_selora", [PF, UNFUSED], False),
    ("recipe ZeRO-3 LoRA (padding-free logits)", "zero3", "lora", "llama_lora", [PF, UNFUSED], False),
    # 4-bit rows are compared with a PEFT loop on the same bitsandbytes nf4 base (QLORA_LOOP)
    ("recipe plain 4-bit LoRA (padding-free)", "plain", "lora", "qlora_lora", [PF], False),
    ("recipe plain 4-bit SeLoRA (padding-free)", "plain", "selora", "qlora_selora", [PF], False),
    ("recipe plain 4-bit SRLoRA (padding-free)", "plain", "srlora", "qlora_srlora", [PF], False),
    ("recipe plain 4-bit LoRA (padding-free compiled)", "plain", "lora", "qlora_lora", [PF, COMPILED], False),
    ("recipe plain 4-bit SeLoRA (padding-free compiled)", "plain", "selora", "qlora_selora", [PF, COMPILED], False),
]
PEFT_LOOP, QLORA_LOOP = "plain PEFT loop", "PEFT loop on the nf4 base"
# bf16 matrix work an H100/H200 reaches (the device notes: ~790 TFLOP/s), for the hardware-FLOPs share.
PEAK_FLOPS = 790e12



def preset(name: str) -> dict:
    from recipes.modeling import preset_config
    return preset_config(name)


# ----- the two anchors ---------------------------------------------------------------------------------------
def build_peft_model(shape: str, rank: int, device, dtype, quantization: str = "none"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**preset(shape))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if quantization != "none":  # the recipe's own swap to bitsandbytes layers: the same base as its 4-bit rows
        from recipes.modeling import quantize_linears
        quantize_linears(model, quantization, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=PROJECTIONS)
    return get_peft_model(model, lora)


def matmul_parameters(shape: dict) -> int:
    """Weights that multiply each token (the projections and the output layer) of a LLaMA-shaped preset."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape.get("num_key_value_heads", shape["num_attention_heads"])
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * shape["vocab_size"]


def random_batches(count: int, batch: int, seq: int, vocab: int, device):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=generator).to(device) for _ in range(count)]


class PeftLoop:
    """A hand-written loop: forward, backward, clip, fused AdamW, zero_grad; the loss read every step. Its model
    stays resident, so the loop is timed again right after every recipe row: this host's speed drifts by up to
    50% within a call (other tenants), and a row is compared with the loop timed beside it."""

    def __init__(self, args, device, dtype, quantization: str = "none"):
        self.args, self.device = args, device
        self.model = build_peft_model(args.shape, args.rank, device, dtype, quantization)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, fused=device.type == "cuda")
        self.batches = random_batches(args.warmup + args.steps, args.batch, args.seq, self.model.config.vocab_size,
                                      device)
        self.resident = 0  # bytes of other models kept on the GPU beside this one

    def step(self, ids) -> float:
        """One optimizer step on token ids (batch, seq); returns the loss."""
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def time(self) -> dict:
        """Warm-up plus timed steps: tokens/s and seconds per step (median of the timed steps)."""
        args = self.args
        times = []
        self.model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for ids in self.batches:
            start = time.perf_counter()
            self.step(ids)
            times.append(time.perf_counter() - start)
        result = {}
        if self.device.type == "cuda":  # what the loop itself needs; the other resident loop's weights left out
            result["peak_memory_gib"] = (torch.cuda.max_memory_allocated(self.device) - self.resident) / 2**30
            torch.cuda.empty_cache()  # the recipe row that runs next gets the memory this loop had cached
        step = statistics.median(times[args.warmup:])
        return {"tokens_per_s": args.batch * args.seq / step, "step_s": step, "padding_share": 0.0, **result}


def hf_trainer(args, device, dtype) -> dict:
    """HF Trainer + PEFT on the same model and batch; step times from a callback (warm-up steps left out)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    model = build_peft_model(args.shape, args.rank, device, dtype)
    steps = args.warmup + args.steps
    ids = random_batches(steps, args.batch, args.seq, model.config.vocab_size, "cpu")

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return steps * args.batch

        def __getitem__(self, index):
            row = ids[index // args.batch][index % args.batch]
            return {"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)}

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], None

        def on_step_begin(self, *_args, **_kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *_args, **_kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.started)

    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=steps, learning_rate=1e-4,
            max_grad_norm=1.0, bf16=dtype == torch.bfloat16, optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
            logging_steps=1, save_strategy="no", report_to=[], gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0,
            use_cpu=device.type != "cuda", disable_tqdm=True, remove_unused_columns=False)
        Trainer(model=model, args=training, train_dataset=Tokens(), callbacks=[timer]).train()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step = statistics.median(timer.times[args.warmup:])
    return {"tokens_per_s": args.batch * args.seq / step, "step_s": step, "padding_share": 0.0}


# ----- the recipe --------------------------------------------------------------------------------------------
def recipe_overrides(args, engine: str, method: str, extra: list[str]) -> list[str]:
    """The row's recipe settings, then its ``extra``; padded rows are packed (data.packing), padding-free rows
    pack by themselves (the recipe refuses both at once)."""
    steps = args.warmup + args.steps
    packing = "data.packing=false" if "data.padding_free=true" in extra else "data.packing=true"
    overrides = [
        f"model.preset={args.shape}", "model.path=null", "model.gradient_checkpointing=true",
        f"train.max_steps={steps}", f"train.micro_batch_size={args.batch}", "train.gradient_accumulation_steps=1",
        "train.warmup_steps=0", "train.save_every=0", "train.eval_every=0", "train.export_peft=false",
        "train.tensorboard=false", "train.resume=never", "train.overwrite=true", "train.log_every=1", "train.max_grad_norm=1.0",
        f"data.max_length={args.seq}", packing, "data.eval_files=[]", "data.eval_fraction=0",
        f"adapter.r={args.rank}", f"adapter.alpha={2 * args.rank}", "adapter.dropout=0.0",
    ]
    if engine != "plain":
        overrides += [f"deepspeed.config={engine}", TORCH_ADAM]
    if args.breakdown:
        overrides.append("train.time_breakdown=true")
    if method == "srlora":  # one recomposition, at the first timed step; its cost is amortised over the interval.
        # The steps after it carry what a run carries from its first recomposition on (on a quantized base, the
        # fused pairs beside it), so the median step is a recomposing run's.
        first = args.warmup + 1
        overrides += ["srlora.schedule=fixed", f"srlora.start_step={first}", f"srlora.interval={args.srlora_interval}",
                      f"srlora.end_step={first}", "srlora.svd=randomized"]
    return overrides + list(extra)


def recipe_row(args, recipe: str, engine: str, method: str, extra: list[str], work: Path,
               entry: str = "launch/train.py") -> dict:
    """One recipe run in its own process (``entry``: launch/train.py or a script that takes its arguments)."""
    from recipes.metrics import read_metrics
    output = work / f"{recipe}_{engine}"
    command = [sys.executable, entry, "--recipe", recipe, *recipe_overrides(args, engine, method, extra),
               f"train.output_dir={output}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": failure_line(result.stderr or result.stdout)}
    lines = [line for line in read_metrics(output / "metrics.jsonl") if "tokens_per_s" in line]
    timed = [line for line in lines if line["step"] > args.warmup]
    # Each line covers one step: its wall time is its real tokens over its tokens/s.
    step_times = {line["step"]: line["tokens"] / line["tokens_per_s"] for line in timed if "tokens" in line}
    recomposition_steps = {line["step"] for line in timed if "srlora" in line}
    plain = [t for s, t in step_times.items() if s not in recomposition_steps]
    step = statistics.median(plain)
    extra_time = sum(step_times[s] - step for s in recomposition_steps)
    amortised = step + (extra_time / args.srlora_interval if recomposition_steps else 0.0)
    tokens = statistics.median(line["tokens"] for line in timed)
    row = {"tokens_per_s": tokens / amortised, "step_s": amortised,
           "padding_share": statistics.median(line.get("padding_share", 0.0) for line in timed),
           # same data, seed and start in every row of a method: rows that should compute the same function
           # (padded, padding-free with either attention) must agree here up to bf16 rounding
           "first_loss": next((line["loss"] for line in lines if line["step"] == 1), None)}
    if any("peak_memory_gib" in line for line in lines):
        row["peak_memory_gib"] = max(line.get("peak_memory_gib", 0.0) for line in lines)
    breakdown = [line["time_breakdown"] for line in timed if "time_breakdown" in line]
    if breakdown:
        row["time_breakdown_ms"] = {key: round(1e3 * statistics.median(b[key] for b in breakdown), 2)
                                    for key in breakdown[0]}
    if recomposition_steps:
        row["recomposition_s"] = round(extra_time / len(recomposition_steps), 3)
    return row


def failure_line(output: str) -> str:
    """The line of a failed run's output that says what failed: the recipe's own 'failed after optimizer step'
    line where there is one (a traceback's last line is often a library's hint, e.g. TorchDynamo's
    'Set TORCHDYNAMO_VERBOSE=1 ...'), else the last line."""
    lines = output.strip().splitlines() or [""]
    said = [line for line in lines if "failed after optimizer step" in line]
    return (said or lines)[-1][:300]


# ----- table -------------------------------------------------------------------------------------------------
def markdown(document: dict) -> str:
    lines = [f"# The whole recipe vs a plain PEFT loop and HF Trainer + PEFT ({document['device']})", "",
             "Written by `bench/recipe_vs_peft.py`; ratios are to anchors measured in the same call.", "",
             "`x PEFT loop` counts real tokens against the plain PEFT loop timed just before and just after the row (the "
             "loop's model stays resident; `PEFT loop beside it` is the mean of those two timings: this host's speed "
             "drifts by up to 50% within a call); `same work` compares positions computed per second (pads included), "
             "which separates the engine's speed from how well the data packs (the anchors' random rows have no pads). "
             "`x Trainer` is against the one HF Trainer run at the start.",
             "",
             "`first loss` is the step-1 loss: rows of one method start from the same weights on the same examples, so "
             "padded and padding-free rows (either attention) must agree to bf16 rounding. 4-bit rows are against "
             f"the {QLORA_LOOP} (PEFT LoRA on the recipe's own bitsandbytes nf4 layers) timed beside them. "
             "`peak GiB`: allocated high-water mark of the row (a loop's: its own, the other resident loop left "
             "out). `hw FLOPs`: 6 x the matmul weights x tokens/s (forward, recomputed forward, input gradients) "
             f"over {PEAK_FLOPS / 1e12:.0f} TFLOP/s.", "",
             "| shape | row | engine | method | tokens/s | PEFT loop beside it | x PEFT loop | x Trainer | padding | "
             "same work | first loss | peak GiB | hw FLOPs | breakdown (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in document["rows"]:
        if "error" in row:
            lines.append(f"| {row['shape']} | {row['name']} | {row['engine']} | {row['method']} | failed: "
                         f"{row['error']} | | | | | | | | | |")
            continue
        pad = "" if row.get("padding_share") is None else f"{100 * row['padding_share']:.1f}%"
        same_work = "" if row.get("padding_share") is None else \
            f"{row['ratio_to_peft_loop'] / (1.0 - row['padding_share']):.2f}"
        breakdown = ", ".join(f"{k} {v}" for k, v in row.get("time_breakdown_ms", {}).items())
        first_loss = "" if row.get("first_loss") is None else f"{row['first_loss']:.4f}"
        beside = f"{row['peft_loop_tokens_per_s']:,.0f}" if "peft_loop_tokens_per_s" in row else ""
        trainer = f"{row['ratio_to_trainer']:.2f}" if "ratio_to_trainer" in row else ""
        memory = f"{row['peak_memory_gib']:.1f}" if "peak_memory_gib" in row else ""
        flops = f"{100 * row['hw_flops_share']:.0f}%" if "hw_flops_share" in row else ""
        lines.append(f"| {row['shape']} | {row['name']} | {row['engine']} | {row['method']} | "
                     f"{row['tokens_per_s']:,.0f} | {beside} | {row['ratio_to_peft_loop']:.2f} | {trainer} | "
                     f"{pad} | {same_work} | {first_loss} | {memory} | {flops} | {breakdown} |")
    return "\n".join(lines + rounds_table(document["rows"])) + "\n"


def rounds_table(rows: list) -> list[str]:
    """Each row run in several interleaved rounds (--rounds): the median of its ratios, with their range."""
    runs: dict[tuple, list] = {}
    for row in rows:
        if "round" in row and "tokens_per_s" in row:
            runs.setdefault((row["shape"], row["name"]), []).append(row)
    if not runs:
        return []
    lines = ["", "Rows run in interleaved rounds: medians [range] over the rounds.", "",
             "| shape | row | rounds | tokens/s | x PEFT loop | step (ms) |", "|---|---|---|---|---|---|"]
    for (shape, name), group in runs.items():
        def cell(key, scale=1.0, digits=2):
            middle, low, high = median_range(scale * row[key] for row in group)
            return f"{middle:,.{digits}f} [{low:,.{digits}f}-{high:,.{digits}f}]"
        lines.append(f"| {shape} | {name} | {len(group)} | {cell('tokens_per_s', digits=0)} | "
                     f"{cell('ratio_to_peft_loop')} | {cell('step_s', 1e3, 1)} |")
    return lines


def add_row_arguments(parser, steps: int) -> None:
    """What a recipe row is run with (`recipe_overrides` reads them): shape, batch, rank, steps."""
    parser.add_argument("--shape", default="llama_1b_bench", help="a preset of configs/models/")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per row (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--srlora-interval", type=int, default=100)


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__)
    add_row_arguments(parser, steps=20)
    parser.add_argument("--rows", default="all", help="all | core | comma-separated row names")
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny preset (or --shape), few steps")
    parser.add_argument("--breakdown", action="store_true",
                        help="log seconds per phase in every recipe row (synchronises the GPU between phases)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="start no recipe row after this many seconds (the table so far is written after every row)")
    parser.add_argument("--trainer", action=argparse.BooleanOptionalAction, default=True,
                        help="time HF Trainer + PEFT as a second anchor (--no-trainer: leave it out)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the rows this many times, interleaved; the table adds each row's median over them")
    args = parser.parse_args(argv)
    names = [row.strip() for row in args.rows.split(",")]
    unknown = [row for row in names if row not in ("all", "core", *(r[0] for r in RECIPE_ROWS))]
    if unknown:
        parser.error(f"--rows: no row named {unknown}; give all, core or names from: "
                     + ", ".join(repr(r[0]) for r in RECIPE_ROWS))
    wanted = RECIPE_ROWS if args.rows == "all" else [r for r in RECIPE_ROWS if r[5]] if args.rows == "core" else \
        [next(r for r in RECIPE_ROWS if r[0] == name) for name in names]  # in the order given
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup, args.rank = 2, 256, 6, 3, 8
        args.shape = "tiny_llama" if args.shape == "llama_1b_bench" else args.shape
    device, dtype, name = pick_device()
    shape_label = f"{args.shape} {args.batch}x{args.seq}"

    if device.type != "cuda":  # bitsandbytes 4-bit and DeepSpeed on CPU are covered by the tests, not timed here
        wanted = [r for r in wanted if r[1] == "plain" and "4-bit" not in r[0]]
    anchors = {"HF Trainer + PEFT": hf_trainer(args, device, dtype)} if args.trainer else {}  # gone before the loops stay
    loops = {PEFT_LOOP: PeftLoop(args, device, dtype)}
    if any(r[3].startswith("qlora") for r in wanted):
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        loops[QLORA_LOOP] = PeftLoop(args, device, dtype, quantization="4bit")
        loops[QLORA_LOOP].resident = resident
        loops[PEFT_LOOP].resident = torch.cuda.memory_allocated(device) - resident if device.type == "cuda" else 0
    anchors = {**{name: loop.time() for name, loop in loops.items()}, **anchors}
    rows = [{"name": key, "engine": "anchor", "method": "peft_lora", **value} for key, value in anchors.items()]
    last_timed = {name: anchors[name]["tokens_per_s"] for name in loops}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    question = "recipe_vs_peft_smoke" if args.smoke else "recipe_vs_peft"
    today = out / f"{question}_{time.strftime('%Y-%m-%d')}.json"
    earlier = json.loads(today.read_text())["rows"] if today.is_file() else []
    write_table(out, question, earlier, rows, anchors, shape_label, name)
    begun = time.time()
    # Rounds interleave the rows (A B A B ...), so a drift of the host's speed falls on every row alike.
    order = [(round_index, row) for round_index in range(1, args.rounds + 1) for row in wanted]
    with tempfile.TemporaryDirectory() as work:
        for round_index, (row_name, engine, method, recipe, extra, _core) in order:
            if args.budget is not None and time.time() - begun > args.budget:
                print(f"{row_name}: not run (--budget {args.budget:.0f} s spent)", flush=True)
                continue
            started = time.time()
            anchor = QLORA_LOOP if recipe.startswith("qlora") else PEFT_LOOP
            row = {"name": row_name, "engine": engine, "method": method, "anchor": anchor,
                   **recipe_row(args, recipe, engine, method, extra, Path(work))}
            if args.rounds > 1:
                row["round"] = round_index
            after = loops[anchor].time()["tokens_per_s"]
            row["peft_loop_tokens_per_s"] = (last_timed[anchor] + after) / 2  # the loop just before and after
            last_timed[anchor] = after
            rows.append(row)
            print(f"{row_name}: {rows[-1].get('tokens_per_s', rows[-1].get('error'))} ({time.time() - started:.0f} s)",
                  flush=True)
            write_table(out, question, earlier, rows, anchors, shape_label, name)  # a call cut short keeps what finished
    print(write_table(out, question, earlier, rows, anchors, shape_label, name))
    return {"rows": rows}


def write_table(out: Path, question: str, earlier: list, rows: list, anchors: dict, shape_label: str,
                device_name: str) -> str:
    """Ratios to this call's anchors; today's json keeps other scales' rows (``earlier``) and replaces this one's."""
    matmul_weights = matmul_parameters(preset(shape_label.split()[0]))
    for row in rows:
        row["shape"] = shape_label
        if "tokens_per_s" in row:
            loop = row.get("peft_loop_tokens_per_s", anchors[row.get("anchor", row["name"])]["tokens_per_s"])
            row["ratio_to_peft_loop"] = row["tokens_per_s"] / loop
            if "HF Trainer + PEFT" in anchors:
                row["ratio_to_trainer"] = row["tokens_per_s"] / anchors["HF Trainer + PEFT"]["tokens_per_s"]
            if "cuda" in device_name.lower() or "nvidia" in device_name.lower():
                row["hw_flops_share"] = 6 * matmul_weights * row["tokens_per_s"] / PEAK_FLOPS
    document = {"device": device_name, "rows": [r for r in earlier if r.get("shape") != shape_label] + rows}
    table = markdown(document)
    write_results(out, question, table, document, device_name)
    return table


if __name__ == "__main__":
    main()
