"""The quality study (docs/quality.md): SmolLM2-135M-Instruct fine-tuned with LoRA, SeLoRA, SeDoRA and SRLoRA on
arithmetic word problems and three multiple-choice sets, learning rates chosen per family on held-out records.

    python bench/quality_smollm2.py prepare                 # task files under .quality/smollm2/data
    python bench/quality_smollm2.py smoke                   # CPU, tiny model: the whole pipeline
    python bench/quality_smollm2.py convert-model --gguf X.gguf --out DIR   # GGUF -> de-quantized HF folder, once
    python bench/quality_smollm2.py run --model-path DIR    # GPU (bench/quality_smollm2_gpu.sh): sweep, then grid
    python bench/quality_smollm2.py report --results R.jsonl  # tables, plots and docs/quality.md's marked sections

``--study srlora``: SRLoRA at ranks 2 and 4, 800 steps. `run` skips runs already in WORK/results.jsonl or --results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
MATH_SETS = ("AddSub", "SingleEq", "MultiArith")  # gsm8k's questions are removed from training but not tested
CHOICE_SETS = {"boolq": "boolq", "arc_easy": "ARC-Easy", "openbookqa": "openbookqa"}


# ----- the study's settings (one place; `run` writes them to WORK/settings.json for its runs) ----------------------
@dataclass
class Settings:
    steps: int = 200               # optimizer steps per run
    micro_batch: int = 16
    max_length: int = 256          # tokens; the longest training record is 216 with SmolLM2's tokenizer
    warmup: int = 10
    train_choice: int = 300        # training records per choice set (math: every clean, unseen problem)
    heldout_math: int = 80         # math training records kept back for choosing the learning rate
    test_math: int = 300           # per math test set
    test_choice: int = 200         # per choice test set
    max_new_tokens: int = 128      # math answers: median 61-73 tokens
    eval_batch: int = 32  # 8 runs x 64 ran the H100 out of memory in the choice scoring (vocab 49152 logits)
    generate_batch: int = 128  # generation keeps one position's logits; at 32 it took ~280 s of a run's ~400
    model_path: str | None = None  # a de-quantized HF folder (convert-model) or the .gguf itself
    model_preset: str | None = None
    data: str = str(ROOT / ".quality" / "smollm2" / "data")
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_stride: int = 1          # every sweep_stride-th rate of the sweep (the smoke takes the two ends)
    sweep_steps: int | None = None  # steps of a learning-rate sweep run (None: steps)
    study: str = "main"            # which grid: "main" (the method comparison) or "srlora" (SRLoRA at small ranks)


# The SRLoRA study (issue 28): small ranks, 4x longer runs, 3x the commonsense records; rates swept on shorter runs.
STUDY_SETTINGS = {"main": {}, "srlora": dict(steps=800, sweep_steps=300, train_choice=1000, test_math=200, test_choice=150,
                                             data=str(ROOT / ".quality" / "srlora" / "data"), study="srlora")}
STUDY = "main"  # the grid this process plans, runs and reports (use_study)
REPORT_FOLDER = {"main": "smollm2", "srlora": "srlora"}  # under docs/quality; its sections' prefix in quality.md


def use_study(name: str) -> None:
    global STUDY
    STUDY = name


# ----- the methods -----------------------------------------------------------------------------------------------
@dataclass
class Method:
    name: str
    recipe: str
    family: str                    # whose learning rate it uses
    overrides: list[str] = field(default_factory=list)
    headline: bool = False         # run with every seed


def srlora_paper_schedule(steps: int, r: int, gamma: float = 0.5, target_rank: int | None = None) -> dict:
    """SRLoRA's schedule: gamma r pairs per switch, (r_target - r) / (gamma r) switches (r_target: 3 r) evenly
    spaced; none at the last step, where it would change nothing that is trained."""
    pairs = max(1, int(round(gamma * r)))
    target = 3 * r if target_rank is None else target_rank
    switches = max(1, (target - r) // pairs)
    interval = max(1, steps // switches)
    return {"pairs": pairs, "target_rank": target, "switches": switches, "start_step": interval,
            "interval": interval, "end_step": steps - 1}


def _rank(r: int) -> list[str]:
    return [f"adapter.r={r}", f"adapter.alpha={2 * r}"]


def methods(steps: int) -> dict[str, Method]:
    """Every row of the active study, in the order the tables show them."""
    return srlora_methods() if STUDY == "srlora" else main_methods(steps)


def srlora_methods() -> dict[str, Method]:
    """SRLoRA at small ranks, where recomposition's extra directions should matter, against LoRA at r and 3 r."""
    def srlora(r: int, start: str = "pissa", **keys) -> list[str]:
        return _rank(r) + [f"adapter.init={start}", "srlora.schedule=paper"] + [f"srlora.{k}={v}" for k, v in keys.items()]
    table = [Method("LoRA r4", "llama_lora", "lora", _rank(4), headline=True),
             Method("LoRA r12", "llama_lora", "lora", _rank(12), headline=True),  # SRLoRA r4's r_target
             Method("PiSSA r4", "llama_lora", "srlora", _rank(4) + ["adapter.init=pissa"], headline=True),
             Method("SRLoRA r4 (paper)", "llama_srlora", "srlora", srlora(4), headline=True),
             Method("SRLoRA r4 (B=0 start)", "llama_srlora", "lora", srlora(4, "default"), headline=True),
             Method("SRLoRA r4 (r_target 8r)", "llama_srlora", "srlora", srlora(4, target_rank=32)),  # 13 switches
             Method("SRLoRA r4 (1 pair per switch)", "llama_srlora", "srlora", srlora(4, pairs_fraction=0.25)),  # 7
             Method("LoRA r2", "llama_lora", "lora", _rank(2)),
             Method("LoRA r6", "llama_lora", "lora", _rank(6)),
             Method("SRLoRA r2 (paper)", "llama_srlora", "srlora", srlora(2)),
             Method("SeLoRA_W r4 50%", "llama_selora", "selora", _rank(4) + ["adapter.basis=haar", "adapter.spectral_ratio=0.5"]),
             Method("SeLoRA_W+SRLoRA r4 50%", "llama_selora_srlora", "srlora",
                    srlora(4) + ["adapter.basis=haar", "adapter.spectral_ratio=0.5"])]
    return {m.name: m for m in table}


def main_methods(steps: int) -> dict[str, Method]:
    """Every row of the method comparison, in the order the tables show them."""
    table: list[Method] = [Method(f"LoRA r{r}", "llama_lora", "lora", _rank(r), headline=r in (8, 16)) for r in (8, 16, 32)]
    for label, basis in (("SeLoRA_W", "haar"), ("SeLoRA_F", "fft2"), ("DCT-rows", "dct_rows")):
        for r in (16, 32):
            for ratio in (0.25, 0.5):
                table.append(Method(f"{label} r{r} {int(ratio * 100)}%", "llama_selora", "selora",
                                    _rank(r) + [f"adapter.basis={basis}", f"adapter.spectral_ratio={ratio}"],
                                    headline=(r, ratio) == (16, 0.5) and basis in ("haar", "fft2")))
    table.append(Method("SeDoRA_W r16 50%", "llama_selora", "selora",
                        _rank(16) + ["adapter.basis=haar", "adapter.spectral_ratio=0.5", "adapter.use_dora=true"]))
    paper = srlora_paper_schedule(steps, 16)
    # Spelled out (schedule=fixed with the same numbers selora's schedule=paper derives), so the rows keep their
    # meaning whatever the recipes' defaults become.
    paper_overrides = ["adapter.init=pissa", "srlora.schedule=fixed", f"srlora.pairs_per_recomposition={paper['pairs']}",
                       *(f"srlora.{key}={paper[key]}" for key in ("start_step", "interval", "end_step"))]
    table.append(Method("SRLoRA r16 (paper)", "llama_srlora", "srlora", _rank(16) + paper_overrides, headline=True))
    # The llama_srlora recipe before it took the paper's settings (1 pair per layer at steps 10..50, B = 0 start):
    # LoRA until step 10, so it takes LoRA's learning rate.
    table.append(Method("SRLoRA r16 (defaults)", "llama_srlora", "lora",
                        _rank(16) + ["adapter.init=default", "srlora.schedule=fixed", "srlora.start_step=10",
                                     "srlora.end_step=50", "srlora.interval=10", "srlora.pairs_per_recomposition=1"]))
    table.append(Method("SeLoRA_W+SRLoRA r16 50%", "llama_selora_srlora", "srlora",
                        _rank(16) + ["adapter.basis=haar", "adapter.spectral_ratio=0.5"] + paper_overrides))
    return {m.name: m for m in table}


# Learning-rate sweep: one method per family at these rates, on the held-out math records.
SWEEP = {"lora": ("LoRA r16", (5e-4, 1e-3, 2e-3)),
         "selora": ("SeLoRA_W r16 50%", (1e-3, 2e-3, 4e-3)),
         "srlora": ("SRLoRA r16 (paper)", (1e-4, 3e-4, 1e-3))}
SWEEPS = {"main": SWEEP, "srlora": {"lora": ("LoRA r4", (1e-3, 2e-3, 4e-3)),
                                   "selora": ("SeLoRA_W r4 50%", (2e-3, 4e-3, 8e-3)),
                                   "srlora": ("SRLoRA r4 (paper)", (1e-4, 3e-4, 1e-3))}}
BASE_ROW = "SmolLM2-135M-Instruct (no fine-tuning)"


# ----- data ------------------------------------------------------------------------------------------------------
def normal(text: str) -> str:
    """A question with case, punctuation and spacing removed (how test questions are found in math_data.json)."""
    return re.sub(r"\W+", " ", text.lower()).strip()


def stated_answer(text: str) -> float | None:
    """The last number after "the answer is" in a worked solution, or None."""
    from recipes.inference import ANSWER_IS
    found = ANSWER_IS.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def consistent(record: dict) -> bool:
    """True when the record's worked solution ends by stating its own numeric ``answer``."""
    stated = stated_answer(record.get("output", ""))
    try:
        return stated is not None and abs(stated - float(record["answer"])) < 1e-4
    except (TypeError, ValueError):
        return False


def split_math(pool: list[dict], tests: list[dict]) -> tuple[list[dict], dict]:
    """math_data.json records in no test set whose worked solution states their numeric answer, and the counts."""
    seen = {normal(r["instruction"]) for r in tests}
    unseen = [r for r in pool if normal(r["instruction"]) not in seen]
    clean = [r for r in unseen if consistent(r)]
    return clean, {"math_data": len(pool), "in_a_test_set": len(pool) - len(unseen),
                   "unseen_but_inconsistent_or_not_numeric": len(unseen) - len(clean), "clean": len(clean)}


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.suffix == ".json" else [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def prepare(source: Path, out: Path, s: Settings, seed: int = 0) -> dict:
    """train.jsonl, heldout_math.jsonl and test_<task>.jsonl under ``out``; returns (and writes) a manifest."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    math_tests = {name: _load(source / name / "test.json") for name in (*MATH_SETS, "gsm8k")}
    clean, counts = split_math(_load(source / "math_data.json"), [r for t in math_tests.values() for r in t])
    rng.shuffle(clean)
    heldout, train = clean[:s.heldout_math], clean[s.heldout_math:]
    _write(out / "heldout_math.jsonl", heldout)
    manifest = {"math": {**counts, "heldout": len(heldout), "train": len(train)}, "tests": {}, "train_choice": {}}
    for name in MATH_SETS:  # test records whose reference solution states the gold answer (for a meaningful loss)
        usable = [r for r in math_tests[name] if consistent(r)]
        rng.shuffle(usable)
        _write(out / f"test_{name}.jsonl", usable[:s.test_math])
        manifest["tests"][name] = {"records": len(math_tests[name]), "consistent": len(usable),
                                   "used": len(usable[:s.test_math])}
    for task, folder in CHOICE_SETS.items():
        records = _load(source / folder / "train.json")
        rng.shuffle(records)
        train += records[:s.train_choice]
        manifest["train_choice"][task] = min(s.train_choice, len(records))
        test = _load(source / folder / "test.json")
        rng.shuffle(test)
        _write(out / f"test_{task}.jsonl", test[:s.test_choice])
        manifest["tests"][task] = {"records": len(test), "used": len(test[:s.test_choice])}
    rng.shuffle(train)
    _write(out / "train.jsonl", train)
    manifest["train_records"] = len(train)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def find_source() -> Path:
    """../shared/data/llm-adapters seen from the checkout (or from a worktree one level deeper)."""
    for folder in (parent / "shared" / "data" / "llm-adapters" for parent in ROOT.parents):
        if folder.is_dir():
            return folder
    raise SystemExit("error: no shared/data/llm-adapters above this checkout; pass --source DIR")


# ----- jobs ------------------------------------------------------------------------------------------------------
def job_id(job: dict) -> str:
    """Stable name of a run: the sweep's include the rate, the test runs do not (their rate comes from the sweep)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", job["method"]).strip("_")
    return f"sweep_{slug}_lr{job['lr']:g}" if job["kind"] == "sweep" else f"{job['kind']}_{slug}_s{job['seed']}"


def plan(table: dict[str, Method], seeds: tuple[int, ...], only: list[str] | None = None, stride: int = 1) -> list[dict]:
    """Every job in starting order: sweep, base model, seed 0 of the headline rows then of the rest, then the other
    seeds (so a study cut short still covers every method once). ``only``: these methods, after the whole sweep."""
    jobs = [{"kind": "sweep", "method": name, "family": family, "seed": seeds[0], "lr": lr}
            for family, (name, rates) in SWEEPS[STUDY].items() for lr in rates[::stride]]
    if STUDY == "main":  # the SRLoRA study's test sets are the same kind; the base's row is in the main one
        jobs.append({"kind": "base", "method": BASE_ROW, "family": None, "seed": seeds[0], "lr": None})
    first = sorted(table.values(), key=lambda m: not m.headline)
    tests = [{"kind": "test", "method": m.name, "family": m.family, "seed": seeds[0], "lr": None} for m in first]
    tests += [{"kind": "test", "method": m.name, "family": m.family, "seed": seed, "lr": None}
              for seed in seeds[1:] for m in table.values() if m.headline]
    if STUDY == "srlora":  # its headline rows need their three seeds more than the side rows need one
        tests.sort(key=lambda j: not table[j["method"]].headline)
    jobs += tests
    return [{**j, "id": job_id(j)} for j in jobs if not only or j["method"] in only or j["kind"] in ("sweep", "base")]


def choose_lr(records: list[dict], family: str, stride: int = 1, rates: tuple[float, ...] | None = None) -> dict | None:
    """The family's rate of lowest held-out loss (NaN: diverged, never chosen); None until its whole sweep is done."""
    name, rates = SWEEPS[STUDY][family][0], rates or SWEEPS[STUDY][family][1][::stride]
    losses = {r["lr"]: r["heldout_loss"] for r in records if r.get("kind") == "sweep" and r["method"] == name}
    if not all(rate in losses for rate in rates):
        return None
    finite = {lr: loss for lr, loss in losses.items() if loss is not None and math.isfinite(loss)}
    if not finite:
        return {"lr": None, "losses": losses, "at_edge": False}
    best = min(finite, key=finite.get)
    return {"lr": best, "losses": losses, "at_edge": best in (min(rates), max(rates))}


def ready(job: dict, records: list[dict], stride: int = 1) -> dict | None:
    """The job with its learning rate filled in when it can start now, else None."""
    if job["kind"] in ("sweep", "base"):
        return job
    chosen = choose_lr(records, job["family"], stride)
    if chosen is None:
        return None
    if chosen["lr"] is None:
        return {**job, "lr": None, "skip": f"every rate of the {job['family']} sweep diverged"}
    return {**job, "lr": chosen["lr"]}


# ----- one run (its own process) --------------------------------------------------------------------------------
def train_overrides(job: dict, method: Method, s: Settings, run_dir: Path) -> list[str]:
    data = Path(s.data)
    heldout = job["kind"] == "sweep"
    steps = s.sweep_steps if heldout and s.sweep_steps else s.steps
    model = f"model.path={s.model_path}" if s.model_path else f"model.preset={s.model_preset or 'tiny_llama'}"
    return [model, f"data.train_files=[{data / 'train.jsonl'}]",
            f"data.eval_files=[{data / 'heldout_math.jsonl'}]" if heldout else "data.eval_files=[]",
            "data.eval_fraction=0", "data.max_eval_records=100000", f"data.max_length={s.max_length}",
            f"train.max_steps={steps}", f"train.micro_batch_size={s.micro_batch}",
            "train.gradient_accumulation_steps=1", f"train.warmup_steps={s.warmup}", "train.lr_scheduler=cosine",
            f"train.eval_every={steps if heldout else 0}", "train.save_every=0", "train.export_peft=false",
            "train.tensorboard=false", "train.resume=never", "train.overwrite=true", "train.log_every=1", f"train.learning_rate={job['lr']}",
            f"train.seed={job['seed']}", f"train.output_dir={run_dir}", "adapter.dropout=0.0",
            f"adapter.seed={job['seed']}", "srlora.svd=full",
            # pinned, so a change of a recipe's defaults cannot change the study: the method's own keys come last
            "train.sample_prompts=[]", "train.weight_decay=0.0", "train.max_grad_norm=1.0", "data.packing=false",
            "data.mask_prompt=true", "model.quantization=none", "model.dtype=auto", "model.gradient_checkpointing=false",
            "deepspeed.config=null", "adapter.use_rslora=false", "adapter.use_dora=false", "adapter.init=default",
            "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", *method.overrides]


def evaluate_command(s: Settings, run_dir: Path, adapter: Path | None, merge: bool = False) -> list[str]:
    """launch/evaluate.py over the six test sets. ``merge`` (DoRA): unmerged, every generated token renormalises
    every adapted weight's rows, and SeDoRA_W's evaluation ran past a call's limit four times."""
    command = [sys.executable, str(ROOT / "launch" / "evaluate.py")]
    command += ["--model-path", s.model_path] if s.model_path else ["--model-preset", s.model_preset or "tiny_llama"]
    if adapter is not None:
        command += ["--adapter", str(adapter)] + (["--merge"] if merge else [])
    command += [arg for task in (*MATH_SETS, *CHOICE_SETS) for arg in ("--task", f"{task}={s.data}/test_{task}.jsonl")]
    return command + ["--batch-size", str(s.eval_batch), "--generate-batch-size", str(s.generate_batch),
                      "--max-new-tokens", str(s.max_new_tokens), "--out", str(run_dir / "eval.json"), "--seed", "0"]


def count_trainable(recipe: str, overrides: list[str]) -> int | None:
    """Trainable parameters of the method on the study's model, built as the recipe builds it."""
    try:
        import torch
        import selora
        from launch.config import resolve
        from recipes import validate as recipe_config
        from recipes.modeling import load_model
        cfg = resolve(recipe, overrides)
        adapter = recipe_config.adapter_config_from(cfg.adapter)
        adapter.init = "default"  # the count does not depend on the start, and this one needs no SVD
        model, _ = load_model(cfg.model, torch.device("cpu"))
        selora.apply(model, adapter)
        return int(selora.count_parameters(model)["trainable"])
    except Exception as error:  # a count is nice to have; the run's results stand without it
        print(f"warning: trainable parameters not counted ({type(error).__name__}: {error})", flush=True)
        return None


def run_one(job: dict, s: Settings, run_dir: Path) -> None:
    """Train (launch/train.py) then evaluate (launch/evaluate.py), each in its own process so that the training's GPU
    memory is gone before the evaluation (eight runs holding both ran the H100 out of memory); writes record.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {k: job[k] for k in ("id", "kind", "method", "family", "seed", "lr")}
    started, adapter, merge = time.time(), None, False
    if job["kind"] == "base":
        record["trainable"] = 0
    else:
        method = methods(s.steps)[job["method"]]
        overrides = train_overrides(job, method, s, run_dir)
        record.update(recipe=method.recipe, overrides=method.overrides)
        subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--recipe", method.recipe, *overrides],
                       cwd=ROOT, check=True)
        metrics = _load(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        record["loss_curve"] = [[m["step"], m["loss"]] for m in metrics if "loss" in m]
        record["recompositions"] = sorted({e["step"] for m in metrics for e in m.get("srlora", [])})
        record["heldout_loss"] = next((m["eval_loss"] for m in reversed(metrics) if "eval_loss" in m), None)
        record["trainable"] = count_trainable(method.recipe, overrides)
        adapter, merge = run_dir / "adapter", "adapter.use_dora=true" in method.overrides
    record["train_seconds"] = time.time() - started
    if job["kind"] != "sweep":
        subprocess.run(evaluate_command(s, run_dir, adapter, merge), check=True)
        record["merged_for_evaluation"] = merge
        record["tasks"] = {name: {k: task.get(k) for k in ("kind", "n", "accuracy", "answer_loss", "seconds")}
                           for name, task in json.loads((run_dir / "eval.json").read_text())["tasks"].items()}
        record["eval_seconds"] = time.time() - started - record["train_seconds"]
    (run_dir / "record.json").write_text(json.dumps(record))


# ----- many runs -------------------------------------------------------------------------------------------------
def read_results(paths: list[Path]) -> list[dict]:
    """Finished runs from one or more results.jsonl files (later files win for the same run id)."""
    return list({r["id"]: r for path in paths if path.is_file() for r in _load(path)}.values())


def pending_jobs(jobs: list[dict], records: list[dict]) -> list[dict]:
    """The jobs without a finished run among ``records`` (what a resumed call still has to do), in plan order."""
    done = {r["id"] for r in records}
    return [j for j in jobs if j["id"] not in done]


def validate(jobs: list[dict], s: Settings) -> None:
    """Resolve every run's config before any GPU time is spent: a bad key or value fails here, in one line."""
    from launch.config import ConfigError, resolve
    from recipes import validate as recipe_config
    table = methods(s.steps)
    for job in [j for j in jobs if j["kind"] != "base"]:
        method = table[job["method"]]
        try:
            cfg = resolve(method.recipe, train_overrides({**job, "lr": 1e-3}, method, s, Path("/tmp/unused")))
            recipe_config.adapter_config_from(cfg.adapter)
            if cfg.srlora.enabled:
                recipe_config.srlora_config_from(cfg)
        except (ConfigError, ValueError) as error:
            raise SystemExit(f"error: {job['method']}: {error}")


def run_all(s: Settings, work: Path, out: Path | None, parallel: int, budget_s: float, jobs: list[dict],
            earlier: list[Path]) -> list[dict]:
    """Run the ``jobs`` not yet in the results, ``parallel`` at a time, each in its own process (its GPU memory goes
    with it); no run starts that would end (at the median length of the runs so far) after ``budget_s``."""
    started, running, durations = time.time(), [], []
    (work / "runs").mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(asdict(s)))
    records = read_results([*earlier, work / "results.jsonl"])

    def save() -> None:  # one file holds the whole study, earlier calls' runs included; ``out`` gets a copy
        for folder in [work, out] if out is not None else [work]:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    save()
    pending = pending_jobs(jobs, records)
    print(f"{len(jobs) - len(pending)} of {len(jobs)} runs already done; {len(pending)} to go, {parallel} at a time, "
          f"budget {budget_s:.0f} s", flush=True)
    # Two intra-op threads a run, fewer where ``parallel`` runs would oversubscribe the cores: the CPU smoke's three
    # runs at once with two busy-waiting OpenMP threads each on 2 cores took 2 s a step instead of 0.04 s.
    threads = max(1, min(2, (os.cpu_count() or 1) // parallel))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    while pending or running:
        while len(running) < parallel:
            index, job = next(((i, r) for i, j in enumerate(pending) if (r := ready(j, records, s.sweep_stride))), (0, None))
            expected = statistics.median(durations) if durations else 0.0
            if job is None or "skip" not in job and time.time() - started + expected > budget_s:
                break
            pending.pop(index)
            if "skip" in job:
                print(f"skipped {job['id']}: {job['skip']}", flush=True)
                continue
            run_dir = work / "runs" / job["id"]
            shutil.rmtree(run_dir, ignore_errors=True)  # a run cut off in an earlier call starts again from scratch
            run_dir.mkdir()
            (run_dir / "job.json").write_text(json.dumps(job))
            command = [sys.executable, str(Path(__file__).resolve()), "one", "--job", str(run_dir / "job.json"),
                       "--settings", str(work / "settings.json")]
            with open(run_dir / "log.txt", "w") as log:  # the child keeps its own handle
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((job, run_dir, process, time.time()))
        if not running:
            if pending:
                print(f"{len(pending)} runs left for the next call (budget spent, or a failed sweep run)", flush=True)
            break
        time.sleep(1)
        for entry in [e for e in running if e[2].poll() is not None]:
            running.remove(entry)
            job, run_dir, process, began = entry
            if process.returncode != 0 or not (run_dir / "record.json").is_file():
                tail = (run_dir / "log.txt").read_text()[-2500:]
                print(f"[{time.time() - started:5.0f} s] FAILED {job['id']} (exit {process.returncode}):\n{tail}", flush=True)
                continue
            records.append({**json.loads((run_dir / "record.json").read_text()), "wall_seconds": time.time() - began})
            durations.append(records[-1]["wall_seconds"])
            save()
            print(f"[{time.time() - started:5.0f} s] {job['id']}: {summary(records[-1])}; {durations[-1]:.0f} s; "
                  f"{len(pending) + len(running)} left", flush=True)
    print(f"finished {len(durations)} runs in {time.time() - started:.0f} s", flush=True)
    return records


def summary(record: dict) -> str:
    if record["kind"] == "sweep":
        return f"lr {record['lr']:g}, held-out math loss {record['heldout_loss']}"
    accuracy = " ".join(f"{t} {record['tasks'][t]['accuracy']:.3f}" for t in MATH_SETS if t in record["tasks"])
    return f"lr {record['lr']}, math accuracy {accuracy}, math loss {mean_of(record, MATH_SETS, 'answer_loss'):.3f}"


def mean_of(record: dict, tasks, key: str) -> float:
    values = [record["tasks"][t][key] for t in tasks if t in record.get("tasks", {}) and record["tasks"][t].get(key) is not None]
    return statistics.fmean(values) if values else float("nan")


# ----- report ----------------------------------------------------------------------------------------------------
def stat(values: list[float], digits: int = 3) -> str:
    """'mean ± sample std' over seeds, or the single value."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def by_method(records: list[dict], steps: int) -> dict[str, list[dict]]:
    """Test runs grouped by method, in table order (the base model first)."""
    order = [BASE_ROW, *methods(steps)]
    tests = [r for r in records if r["kind"] in ("test", "base")]
    return {name: sorted(found, key=lambda r: r["seed"]) for name in order if (found := [r for r in tests if r["method"] == name])}


def loss_at(record: dict, step: int, window: int = 10) -> float | None:
    values = [loss for s, loss in record.get("loss_curve", []) if step - window < s <= step]
    return statistics.fmean(values) if values else None


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def tables(records: list[dict], steps: int) -> str:
    """The markdown tables of docs/quality.md's SmolLM2 section."""
    groups = by_method(records, steps)

    def per_task(items, tasks, key):
        return [stat([r["tasks"][t][key] for r in items if t in r["tasks"]]) for t in tasks]

    choice, marks = list(CHOICE_SETS), sorted({steps // 4, steps // 2, 3 * steps // 4, steps})
    lines = markdown(["method", "trainable", "seeds", "lr", *(f"{t} acc" for t in MATH_SETS), "math acc (mean)",
                   *(f"{t} loss" for t in MATH_SETS), "**math loss (mean)**"],
                  [[name, f"{items[0]['trainable']:,}" if items[0].get("trainable") is not None else "?", str(len(items)),
                    "-" if items[0]["lr"] is None else f"{items[0]['lr']:g}", *per_task(items, MATH_SETS, "accuracy"),
                    stat([mean_of(r, MATH_SETS, "accuracy") for r in items]), *per_task(items, MATH_SETS, "answer_loss"),
                    "**" + stat([mean_of(r, MATH_SETS, "answer_loss") for r in items]) + "**"]
                   for name, items in groups.items()])
    lines += ["", "Multiple choice, second view (answer loss; accuracy of the label's log-likelihood):", ""]
    lines += markdown(["method", "seeds", *(f"{t} loss" for t in choice), *(f"{t} acc" for t in choice)],
                   [[name, str(len(items)), *per_task(items, choice, "answer_loss"), *per_task(items, choice, "accuracy")]
                    for name, items in groups.items()])
    lines += ["", "Training loss (10-step mean before the step; mean ± std over seeds):", ""]
    lines += markdown(["method", "seeds", *(f"@{m}" for m in marks), "recompositions at"],
                   [[name, str(len(items)), *(stat([loss_at(r, m) for r in items]) for m in marks),
                     ", ".join(map(str, items[0].get("recompositions", []))) or "-"]
                    for name, items in groups.items() if name != BASE_ROW])
    return "\n".join(lines) + "\n"


def sweep_table(records: list[dict]) -> str:
    """Held-out loss per swept rate (the rates the results hold) and the choice."""
    lines = []
    for family, (name, _) in SWEEPS[STUDY].items():
        losses = {r["lr"]: r["heldout_loss"] for r in records if r.get("kind") == "sweep" and r["method"] == name}
        if not (rates := tuple(sorted(losses))):
            continue
        chosen = choose_lr(records, family, rates=rates)
        cells = [f"**{losses[lr]:.4f}**" if chosen and lr == chosen["lr"] else
                 (f"{losses[lr]:.4f}" if losses.get(lr) is not None else "-") for lr in rates]
        note = "" if not chosen else (" (at the edge of the grid)" if chosen["at_edge"] else "")
        lines.append(f"| {family} ({name}) | " + " | ".join(f"{lr:g}: {c}" for lr, c in zip(rates, cells))
                     + f" | {chosen['lr'] if chosen else 'incomplete'}{note} |")
    width = max((len(line.split("|")) - 4 for line in lines), default=1)
    return ("| family (swept on) | " + " | ".join(["rate: held-out math loss"] * width) + " | chosen |\n"
            + "|---" * (width + 2) + "|\n" + "\n".join(lines) + "\n")


# The pairs the verdicts rest on, per study: method A | method B | what the difference measures.
COMPARISONS = {"main": """
SeLoRA_W r16 50% | LoRA r16 | same rank, half the parameters
SeLoRA_W r16 50% | LoRA r8 | same parameter count
SeLoRA_F r16 50% | SeLoRA_W r16 50% | Fourier vs wavelet
DCT-rows r16 50% | SeLoRA_W r16 50% | row-wise DCT vs 2-D wavelet
SeLoRA_W r32 25% | LoRA r8 | same parameter count, rank 32
SeDoRA_W r16 50% | SeLoRA_W r16 50% | DoRA on top
SRLoRA r16 (paper) | LoRA r16 | SRLoRA (paper settings) vs LoRA
SRLoRA r16 (defaults) | LoRA r16 | SRLoRA (earlier recipe defaults) vs LoRA
SeLoRA_W+SRLoRA r16 50% | SeLoRA_W r16 50% | SRLoRA on top of SeLoRA_W""",
                "srlora": """
SRLoRA r4 (paper) | LoRA r4 | SRLoRA vs LoRA, same rank
SRLoRA r4 (paper) | LoRA r12 | SRLoRA vs LoRA at its r_target (3x the parameters)
PiSSA r4 | LoRA r4 | the PiSSA start alone
SRLoRA r4 (paper) | PiSSA r4 | recomposition on top of the PiSSA start
SRLoRA r4 (B=0 start) | LoRA r4 | recomposition with the B = 0 start
SRLoRA r4 (r_target 8r) | SRLoRA r4 (paper) | 13 switches instead of 3
SRLoRA r4 (1 pair per switch) | SRLoRA r4 (paper) | 1 pair per switch, 7 switches
SRLoRA r2 (paper) | LoRA r2 | SRLoRA vs LoRA, rank 2
SRLoRA r2 (paper) | LoRA r6 | SRLoRA r2 vs LoRA at its r_target
SeLoRA_W r4 50% | LoRA r4 | SeLoRA_W vs LoRA, rank 4
SeLoRA_W+SRLoRA r4 50% | SeLoRA_W r4 50% | SRLoRA on top of SeLoRA_W"""}


def comparisons(records: list[dict], steps: int) -> str:
    """The pairs the verdicts rest on: difference of means of the math answer loss and accuracy, with spreads."""
    groups = by_method(records, steps)
    rows = []
    for a, b, what in (line.split(" | ") for line in COMPARISONS[STUDY].strip().splitlines()):
        if a not in groups or b not in groups:
            continue
        ga, gb = groups[a], groups[b]
        cells = []
        for tasks, key in ((MATH_SETS, "answer_loss"), (MATH_SETS, "accuracy"), (CHOICE_SETS, "answer_loss")):
            va, vb = [mean_of(r, tasks, key) for r in ga], [mean_of(r, tasks, key) for r in gb]
            spread = max((statistics.stdev(v) for v in (va, vb) if len(v) > 1), default=None)
            cells.append(f"{statistics.fmean(va) - statistics.fmean(vb):+.3f}"
                         + (f" (larger std {spread:.3f})" if spread is not None else ""))
        rows.append([what, a, b, *cells, f"{len(ga)} vs {len(gb)}"])
    return "\n".join(markdown(["comparison", "A", "B", "math loss A - B", "math acc A - B", "choice loss A - B", "seeds"],
                              rows)) + "\n"


def steps_to_reach(records: list[dict], target: float) -> list[int | None]:
    """Per run: the first step whose 10-step mean training loss is at or below ``target`` (None: never)."""
    curves = [sorted(r.get("loss_curve", [])) for r in records]
    return [next((step for i, (step, _) in enumerate(curve)
                  if statistics.fmean(loss for _, loss in curve[max(0, i - 9):i + 1]) <= target), None) for curve in curves]


def convergence(records: list[dict], steps: int) -> str:
    """Steps each row needs, per seed, to reach the final training loss of LoRA at its rank and at 3 r (r_target)."""
    groups = by_method(records, steps)
    rows = []
    for name, items in groups.items():
        if name == BASE_ROW or not (rank := re.search(r" r(\d+)", name)):
            continue
        rows.append([name, str(len(items)), stat([loss_at(r, steps) for r in items])])
        for reference in (f"LoRA r{rank.group(1)}", f"LoRA r{3 * int(rank.group(1))}"):
            target = statistics.fmean(loss_at(r, steps) for r in groups[reference]) if reference in groups else None
            reached = [step for step in steps_to_reach(items, target) if step is not None] if target is not None else []
            rows[-1].append("-" if target is None else f"{stat(reached, 0) if reached else 'never'} ({len(reached)} of "
                            f"{len(items)} reach {target:.3f})")
    return "\n".join(markdown(["method", "seeds", "final train loss", "steps to LoRA r's final loss",
                               "steps to LoRA 3r's final loss"], rows)) + "\n"


def timing(records: list[dict]) -> str:
    parts = []
    for kind in ("sweep", "test", "base"):
        if items := [r for r in records if r["kind"] == kind and "wall_seconds" in r]:
            median = {key: statistics.median(r[key] for r in items) for key in ("wall_seconds", "train_seconds")}
            parts.append(f"{kind}: {len(items)} runs, median {median['wall_seconds']:.0f} s each (train "
                         f"{median['train_seconds']:.0f} s" + ("" if kind == "sweep" else
                         f", eval {statistics.median(r['eval_seconds'] for r in items):.0f} s") + ")")
    return "; ".join(parts) + "\n" if parts else "no timings recorded\n"


def plots(records: list[dict], steps: int, folder: Path) -> None:
    """loss_vs_step.png (headline and SRLoRA rows) and accuracy_vs_params.png in ``folder``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(figure, name: str) -> None:
        figure.tight_layout()
        figure.savefig(folder / name, dpi=80)
        plt.close(figure)

    groups = by_method(records, steps)
    figure, axis = plt.subplots(figsize=(9, 5))
    for name, items in groups.items():
        curves = [dict(map(tuple, r["loss_curve"])) for r in items if r.get("loss_curve")]
        if not curves or not (items[0]["kind"] == "test" and (methods(steps)[name].headline or "SRLoRA" in name)):
            continue
        steps_seen = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [statistics.fmean(c[s] for c in curves) for s in steps_seen]
        smooth = [statistics.fmean(mean[max(0, i - 9):i + 1]) for i in range(len(mean))]
        line, = axis.plot(steps_seen, smooth, label=f"{name} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        for step in items[0].get("recompositions", []):
            axis.axvline(step, color=line.get_color(), linewidth=0.6, linestyle=":")
    axis.set_xlabel("optimizer step"), axis.set_ylabel("training loss (10-step mean, seed mean)")
    axis.set_title("SmolLM2-135M-Instruct; dotted: SRLoRA recompositions"), axis.legend(fontsize=7)
    save(figure, "loss_vs_step.png")
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    markers = {"LoRA": "o", "SeLoRA_W": "s", "SeLoRA_F": "^", "DCT-rows": "v", "SeDoRA_W": "D", "SRLoRA": "*", "SeLoRA_W+SRLoRA": "P"}
    for name, items in groups.items():
        if items[0].get("trainable") in (None, 0):
            continue
        marker = next((m for prefix, m in sorted(markers.items(), key=lambda kv: -len(kv[0])) if name.startswith(prefix)), "x")
        for axis, key in zip(axes, ("accuracy", "answer_loss")):
            values = [mean_of(r, MATH_SETS, key) for r in items]
            axis.errorbar(items[0]["trainable"], statistics.fmean(values),
                          yerr=statistics.stdev(values) if len(values) > 1 else 0.0, fmt=marker, capsize=3, label=name)
    base = groups.get(BASE_ROW)
    if base:  # the base's answer loss (~1.07) is only named: drawn, it would squash the adapters' 0.35-0.43 together
        axes[0].axhline(mean_of(base[0], MATH_SETS, "accuracy"), color="grey", linestyle="--", linewidth=0.8,
                        label="base model")
    for axis in axes:
        axis.set_xscale("log"), axis.set_xlabel("trainable parameters")
    axes[0].set_ylabel("math accuracy of generated answers (mean of 3 sets)")
    base_loss = f"; base {mean_of(base[0], MATH_SETS, 'answer_loss'):.3f}" if base else ""
    axes[1].set_ylabel(f"math answer loss (mean of 3 sets{base_loss})")
    axes[1].legend(fontsize=6, ncol=2)
    save(figure, "accuracy_vs_params.png")


def fill(doc: str, sections: dict[str, str], prefix: str = "smollm2") -> str:
    """Replace the text between ``<!-- PREFIX:NAME -->`` and ``<!-- /PREFIX:NAME -->`` for each section."""
    for name, text in sections.items():
        pattern = re.compile(rf"(<!-- {prefix}:{name} -->\n).*?(<!-- /{prefix}:{name} -->)", re.S)
        if not pattern.search(doc):
            raise SystemExit(f"error: docs/quality.md has no <!-- {prefix}:{name} --> ... <!-- /{prefix}:{name} --> block")
        doc = pattern.sub(lambda m: m.group(1) + text + m.group(2), doc)
    return doc


def report(results: list[Path], docs: Path, steps: int, write_doc: bool = True) -> dict[str, str]:
    if not (records := read_results(results)):
        raise SystemExit(f"error: no finished runs in {', '.join(map(str, results))}")
    folder = docs / "quality" / REPORT_FOLDER[STUDY]
    folder.mkdir(parents=True, exist_ok=True)
    sections = {"sweep": sweep_table(records), "tables": tables(records, steps),
                "comparisons": comparisons(records, steps), "timing": timing(records)}
    if STUDY == "srlora":
        sections["convergence"] = convergence(records, steps)
    plots(records, steps, folder)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "tables.md").write_text(text := "\n".join(f"## {k}\n\n{v}" for k, v in sections.items()))
    if write_doc:
        (docs / "quality.md").write_text(fill((docs / "quality.md").read_text(), sections, REPORT_FOLDER[STUDY]))
    print(text)
    return sections


# ----- smoke (CPU, tiny model) -----------------------------------------------------------------------------------
def smoke(work: Path, source: Path, only: list[str] | None = None) -> None:
    """The whole pipeline on CPU, tiny random model, a handful of records, one method of each kind, scratch docs."""
    started = time.time()
    shutil.rmtree(work, ignore_errors=True)
    longer = dict(steps=30, sweep_steps=12, study="srlora") if STUDY == "srlora" else {}  # 13 switches need 30 steps
    s = Settings(**{**dict(steps=12, micro_batch=2, max_length=320, warmup=2, train_choice=4, heldout_math=4, test_math=3,
                           test_choice=3, max_new_tokens=8, eval_batch=8, generate_batch=4, model_preset="tiny_llama",
                           seeds=(0, 1), sweep_stride=3), **longer}, data=str(work / "data"))
    print(prepare(source, work / "data", s)["math"])
    keep = only or (["LoRA r4", "SRLoRA r4 (paper)", "SRLoRA r4 (r_target 8r)", "SeLoRA_W+SRLoRA r4 50%"] if STUDY == "srlora" else
                    ["LoRA r16", "SeLoRA_W r16 50%", "SeDoRA_W r16 50%", "SRLoRA r16 (paper)", "SRLoRA r16 (defaults)",
                     "SeLoRA_W+SRLoRA r16 50%"])
    table = methods(s.steps)
    validate(plan(table, s.seeds), s)  # every row's config, also those the smoke does not run
    families = {table[name].family for name in keep}  # one seed, except for the first kept method
    jobs = [j for j in plan(table, s.seeds, only=keep, stride=s.sweep_stride) if (j["kind"] != "sweep" or j["family"]
            in families) and not (j["kind"] == "test" and j["seed"] != s.seeds[0] and j["method"] != keep[0])]
    records = run_all(s, work / "study", None, 3, 3600, jobs, [])
    (work / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "quality.md", work / "docs" / "quality.md")
    report([work / "study" / "results.jsonl"], work / "docs", s.steps)
    if missing := [j["id"] for j in jobs if j["id"] not in {r["id"] for r in records}]:
        raise SystemExit(f"error: smoke runs missing: {missing}")
    print(f"smoke passed: {len(records)} runs, report in {work / 'docs'}, {time.time() - started:.0f} s")


# ----- model ------------------------------------------------------------------------------------------------------
def convert_model(gguf: Path, out: Path) -> None:
    """The GGUF de-quantized once into an HF folder: a run loads it in under a second instead of ~20 s of CPU."""
    from recipes import gguf_cache, modeling
    if not gguf.is_file():
        raise SystemExit(f"error: {gguf} not found; on the GPU machine run `bash bench/quality_smollm2_gpu.sh receive` first")
    shutil.copytree(gguf_cache.cached_checkpoint(gguf, modeling._convert_gguf), out, dirs_exist_ok=True)
    print(f"{gguf} -> {out}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("prepare", "smoke", "convert-model", "run", "one", "report"))
    parser.add_argument("--source", help="LLM-Adapters data folder (prepare, smoke)")
    parser.add_argument("--study", default="main", choices=tuple(STUDY_SETTINGS),
                        help="main: the method comparison; srlora: SRLoRA at small ranks, 800 steps")
    parser.add_argument("--gguf"), parser.add_argument("--model-path"), parser.add_argument("--model-preset")
    parser.add_argument("--work", default="/tmp/smollm2_study")
    parser.add_argument("--out", help="run: copy results here as they come (the GPU call's $OUT)")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--budget-seconds", type=float, default=480, help="run: start no run that would end after this")
    parser.add_argument("--only", help="run, smoke: comma-separated method names (the sweep always runs)")
    parser.add_argument("--results", action="append", default=[], help="results.jsonl of earlier calls (repeatable)")
    parser.add_argument("--no-doc", action="store_true", help="report: do not rewrite docs/quality.md")
    parser.add_argument("--job"), parser.add_argument("--settings")
    args = parser.parse_args(argv)
    use_study(args.study)
    s = Settings(**STUDY_SETTINGS[args.study], model_path=args.model_path, model_preset=args.model_preset)
    only = args.only and args.only.split(",")
    if args.command == "prepare":
        print(json.dumps(prepare(Path(args.source or find_source()), Path(s.data), s), indent=1))
    elif args.command == "smoke":
        smoke(Path(args.work), Path(args.source or find_source()), only)
    elif args.command == "convert-model":
        convert_model(Path(args.gguf), Path(args.out))
    elif args.command == "one":  # a run started by run_all, with the settings it wrote
        values = json.loads(Path(args.settings).read_text())
        use_study(values["study"])
        run_one(json.loads(Path(args.job).read_text()), Settings(**values), Path(args.job).parent)
    elif args.command == "report":
        report([Path(p) for p in args.results] or [ROOT / "docs" / "quality" / REPORT_FOLDER[STUDY] / "results.jsonl"],
               ROOT / "docs", s.steps, write_doc=not args.no_doc)
    else:  # run
        if args.model_path and not Path(args.model_path).exists() or not (args.model_path or args.model_preset):
            raise SystemExit(f"error: --model-path {args.model_path} does not exist; pass the converted HF folder (on "
                             "the GPU machine: bash bench/quality_smollm2_gpu.sh) or --model-preset")
        if not (Path(s.data) / "train.jsonl").is_file():
            raise SystemExit(f"error: {s.data}/train.jsonl missing; run `python bench/quality_smollm2.py prepare` here "
                             "and carry .quality/smollm2")
        validate(jobs := plan(methods(s.steps), s.seeds, only), s)
        run_all(s, Path(args.work), args.out and Path(args.out), args.parallel, args.budget_seconds, jobs,
                [Path(p) for p in args.results])


if __name__ == "__main__":
    main()
