"""Method quality on real data: LoRA vs SeLoRA vs SRLoRA (and the compositions, and a 4-bit base) fine-tuned from a
base pre-trained by bench/pretrain_base.py, on four LLM-Adapters tasks (BoolQ, ARC-Easy, OpenBookQA, arithmetic
word problems with worked answers).

    python bench/quality.py prepare                                   # (dev machine) .quality/data/*.jsonl
    python bench/quality.py sweep --base .quality/base --out docs     # (GPU) learning rate per family, held-out data
    python bench/quality.py grid  --base .quality/base --out docs     # (GPU) the grid at the chosen rates
    python bench/quality.py report --out docs                         # tables + PNGs from docs/quality/*.json

Every run goes through the recipe entry point (`launch/train.py`, one subprocess per run; `--parallel N` runs
N at once on the same GPU, since runs of a 23M model are launch-bound). Learning rates are chosen per method
family on held-out slices of the *training* data; test sets are used only for the final numbers. Per task:
loss on the answer tokens, and accuracy of the greedily generated answer (label, or the final number for math).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / ".quality" / "data"
CHOICE_TASKS = {"boolq": "boolq", "arc_easy": "ARC-Easy", "openbookqa": "openbookqa"}
MATH_TESTS = ("AddSub", "SingleEq", "MultiArith")  # math test: these three (gsm8k is far beyond a 23M model)
TASKS = [*CHOICE_TASKS, "math"]
TRAIN_PER_TASK, HELDOUT_PER_TASK, TEST_PER_TASK = 1000, 100, 200
MAX_STEPS = int(os.environ.get("QUALITY_MAX_STEPS", 300))
COMMON = [f"train.max_steps={MAX_STEPS}", "train.micro_batch_size=16", "train.gradient_accumulation_steps=1",
          f"train.warmup_steps={min(20, MAX_STEPS // 5)}", "train.save_every=0", "train.eval_every=0", "train.export_peft=false",
          "train.tensorboard=false", "train.resume=never", "train.overwrite=true", "data.max_length=384", "data.eval_files=[]",
          "data.eval_fraction=0", "adapter.dropout=0.0", "srlora.schedule=fixed", f"srlora.start_step={MAX_STEPS // 5}",
          f"srlora.interval={MAX_STEPS // 5}", f"srlora.end_step={4 * MAX_STEPS // 5}", "srlora.pairs_per_recomposition=2", "srlora.svd=full"]


def method(recipe, r, family, **extra):
    overrides = [f"adapter.r={r}", f"adapter.alpha={2 * r}"] + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return {"recipe": recipe, "family": family, "overrides": overrides,
            "base": "4-bit" if recipe.startswith("qlora") else "bf16"}


METHODS = {
    **{f"LoRA r{r}": method("llama_lora", r, "lora") for r in (8, 16, 32)},
    **{f"SeLoRA r{r} {int(p * 100)}%": method("llama_selora", r, "selora", adapter__spectral_ratio=p)
       for r in (8, 16, 32) for p in (0.25, 0.5, 1.0)},
    "SRLoRA r16": method("llama_srlora", 16, "srlora", adapter__init="default"),  # as the appendix study ran
    "SeLoRA+SRLoRA r16 50%": method("llama_selora_srlora", 16, "srlora", adapter__spectral_ratio=0.5,
                                    adapter__init="default"),
    "SeLoRA+DoRA r16 50%": method("llama_selora", 16, "selora", adapter__use_dora="true"),
    "SeLoRA+PiSSA r16 50%": method("llama_selora", 16, "selora", adapter__init="pissa"),
    "QLoRA r16": method("qlora_lora", 16, "lora"),
    "QSeLoRA r16 50%": method("qlora_selora", 16, "selora"),
    "QSRLoRA r16": method("qlora_srlora", 16, "srlora"),
}
SWEEP = {"lora": "LoRA r16", "selora": "SeLoRA r16 50%", "srlora": "SRLoRA r16"}
SWEEP_RATES = [1e-3, 2e-3, 4e-3, 8e-3]
HEADLINE = ["LoRA r16", "LoRA r8", "SeLoRA r16 50%", "SeLoRA r16 25%", "SRLoRA r16"]  # 3 seeds each
SEEDS = (0, 1, 2)


# ----- data -----------------------------------------------------------------------------------------------------
def _normal(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def prepare(source: Path) -> None:
    """Train / held-out / test files. Math training records are LLM-Adapters' math_data.json minus every record
    whose question appears in any math test set (most of math_data is drawn from them)."""
    rng = random.Random(0)
    DATA.mkdir(parents=True, exist_ok=True)
    train = []
    for task, folder in CHOICE_TASKS.items():
        records = json.loads((source / folder / "train.json").read_text())
        rng.shuffle(records)
        train += records[:TRAIN_PER_TASK]
        _write(DATA / f"heldout_{task}.jsonl", records[TRAIN_PER_TASK:TRAIN_PER_TASK + HELDOUT_PER_TASK])
        test = json.loads((source / folder / "test.json").read_text())
        rng.shuffle(test)
        _write(DATA / f"test_{task}.jsonl", test[:TEST_PER_TASK])
    math_test = [r for name in MATH_TESTS for r in json.loads((source / name / "test.json").read_text())]
    gsm8k = json.loads((source / "gsm8k" / "test.json").read_text())
    seen = {_normal(r["instruction"]) for r in math_test + gsm8k}
    math_pool = [r for r in json.loads((source / "math_data.json").read_text()) if _normal(r["instruction"]) not in seen]
    rng.shuffle(math_pool)
    _write(DATA / "heldout_math.jsonl", math_pool[:HELDOUT_PER_TASK])
    train += math_pool[HELDOUT_PER_TASK:HELDOUT_PER_TASK + TRAIN_PER_TASK]
    rng.shuffle(math_test)
    _write(DATA / "test_math.jsonl", math_test[:TEST_PER_TASK])
    rng.shuffle(train)
    _write(DATA / "train.jsonl", train)
    print(f"{len(train)} train ({len(math_pool) - HELDOUT_PER_TASK} math left after removing test questions), "
          f"{HELDOUT_PER_TASK} held-out and {TEST_PER_TASK} test per task -> {DATA}")


# ----- one run (a subprocess) -------------------------------------------------------------------------------------
def parse_answer(task: str, text: str) -> str | None:
    text = text.lower()
    if task == "math":
        found = re.findall(r"answer is\s*\$?(-?[\d,]*\.?\d+)", text)
        return found[-1].replace(",", "") if found else None
    found = re.findall(r"\b(true|false)\b" if task == "boolq" else r"answer\s*([1-5])", text)
    if not found:
        return None
    return found[0] if task == "boolq" else f"answer{found[0]}"


def is_correct(task: str, predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    if task == "math":
        try:
            return abs(float(predicted) - float(gold)) < 1e-4
        except ValueError:
            return False
    return predicted == gold


def evaluate(model, tokenizer, task: str, path: Path, generate: bool, device) -> dict:
    """Mean loss per answer token (the recipe's tokenization: prompt masked, EOS learned) and, with ``generate``,
    greedy-generation accuracy."""
    import torch
    from recipes.data import format_prompt, load_records, make_collate_fn, tokenize_records
    records = [json.loads(line) for line in path.read_text().splitlines()]
    encoded = tokenize_records(load_records(str(path)), tokenizer, 384)
    collate = make_collate_fn(tokenizer.pad_token_id)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), 32):
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in range(start, min(start + 32, len(encoded)))]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            loss_sum += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                          ignore_index=-100, reduction="sum").item()
            tokens += int((labels != -100).sum())
    result = {"loss": loss_sum / tokens}
    if not generate:
        return result
    correct = 0
    for start in range(0, len(records), 64):
        chunk = records[start:start + 64]
        prompts = [[tokenizer.bos_token_id] + tokenizer(format_prompt(r), add_special_tokens=False)["input_ids"] for r in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=96 if task == "math" else 12,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for record, row in zip(chunk, generated[:, width:]):
            correct += is_correct(task, parse_answer(task, tokenizer.decode(row, skip_special_tokens=True)), record["answer"])
    result["accuracy"] = correct / len(records)
    return result


def one_run(name: str, seed: int, lr: float, split: str, base: Path, out: Path) -> dict:
    """Train through the recipe entry point, then evaluate the saved adapter per task on ``split``."""
    import torch
    import selora
    from launch.config import resolve
    from launch.train import main as launch
    from recipes.modeling import load_model, load_tokenizer
    spec = METHODS[name]
    overrides = [*COMMON, *spec["overrides"], f"model.path={base}", f"tokenizer.path={base}",
                 f"data.train_files=[{DATA / 'train.jsonl'}]", f"train.learning_rate={lr}", f"train.seed={seed}",
                 f"adapter.seed={seed}", f"train.output_dir={out}"]
    started = time.time()
    if launch(["--recipe", spec["recipe"], *overrides]) != 0:
        raise SystemExit(f"run {name} failed")
    trained = time.time()
    cfg = resolve(spec["recipe"], overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(cfg.model, device)
    selora.load_adapter(model, out / "adapter")
    model.eval()
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {"method": name, "seed": seed, "lr": lr, "split": split, "family": spec["family"], "base": spec["base"],
              "trainable": selora.count_parameters(model)["trainable"],
              "tasks": {t: evaluate(model, tokenizer, t, DATA / f"{split}_{t}.jsonl", split == "test", device)
                        for t in TASKS},
              "loss_curve": [(m["step"], m["loss"]) for m in metrics if "loss" in m],
              "recompositions": [e for m in metrics for e in m.get("srlora", [])],
              "train_seconds": trained - started, "eval_seconds": time.time() - trained}
    result["mean_loss"] = statistics.fmean(r["loss"] for r in result["tasks"].values())
    if split == "test":
        result["mean_accuracy"] = statistics.fmean(r["accuracy"] for r in result["tasks"].values())
    (out / "quality_result.json").write_text(json.dumps(result))
    return result


# ----- many runs ------------------------------------------------------------------------------------------------
def run_all(jobs: list[dict], base: Path, work: Path, parallel: int, budget_s: float,
            on_done=lambda done, skipped: None) -> tuple[list[dict], list[dict]]:
    """Each job {method, seed, lr, split} in its own process, ``parallel`` at a time; jobs not started within
    ``budget_s`` are returned as skipped (so a device call ends in time, with what it finished). ``on_done`` is
    called after every finished run, so results survive a call that is cut off."""
    started, pending, running, done, skipped = time.time(), list(jobs), [], [], []
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            if time.time() - started > budget_s:
                skipped.append(job)
                continue
            out = work / f"{re.sub(r'[^A-Za-z0-9]+', '_', job['method'])}_s{job['seed']}_lr{job['lr']:g}_{job['split']}"
            log = open(work / f"{out.name}.log", "w")
            command = [sys.executable, str(Path(__file__).resolve()), "one", "--method", job["method"],
                       "--seed", str(job["seed"]), "--lr", str(job["lr"]), "--split", job["split"],
                       "--base", str(base), "--run-dir", str(out)]
            running.append((job, out, log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(1)
        for entry in list(running):
            job, out, log, process = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            log.close()
            if process.returncode != 0:
                tail = Path(log.name).read_text()[-3000:]
                raise SystemExit(f"run {job} failed (exit {process.returncode}):\n{tail}")
            done.append(json.loads((out / "quality_result.json").read_text()))
            print(f"[{time.time() - started:5.0f} s] {job['method']} seed {job['seed']} lr {job['lr']:g} "
                  f"{job['split']}: mean loss {done[-1]['mean_loss']:.4f}"
                  + (f", mean accuracy {done[-1]['mean_accuracy']:.3f}" if "mean_accuracy" in done[-1] else ""), flush=True)
            on_done(done, skipped + pending)
    return done, skipped


def sweep(base: Path, out_docs: Path, work: Path, parallel: int, budget_s: float) -> None:
    jobs = [{"method": name, "seed": 0, "lr": lr, "split": "heldout"} for name in SWEEP.values() for lr in SWEEP_RATES]
    (out_docs / "quality").mkdir(parents=True, exist_ok=True)
    done, skipped = run_all(jobs, base, work, parallel, budget_s)
    chosen = {}
    for family, name in SWEEP.items():
        losses = {r["lr"]: r["mean_loss"] for r in done if r["method"] == name and r["mean_loss"] == r["mean_loss"]}
        chosen[family] = {"chosen": min(losses, key=losses.get), "heldout_mean_loss": losses}
        print(family, chosen[family], flush=True)
    (out_docs / "quality" / "sweep.json").write_text(json.dumps({"lr": chosen, "runs": done, "skipped": skipped}))


def grid(base: Path, out_docs: Path, work: Path, parallel: int, budget_s: float, only: list[str] | None) -> None:
    chosen = json.loads((out_docs / "quality" / "sweep.json").read_text())["lr"]
    plan = [(n, 0) for n in METHODS] + [(n, seed) for seed in SEEDS[1:] for n in HEADLINE]  # breadth first
    if only:
        plan = [(n, s) for n, s in plan if n in only]
    path = out_docs / "quality" / "grid.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text())["runs"] if path.is_file() else []
    if not only:  # continue an earlier, cut-off grid: runs already in grid.json are not repeated
        plan = [(n, s) for n, s in plan if (n, s) not in {(r["method"], r["seed"]) for r in previous}]
    jobs = [{"method": n, "seed": s, "lr": chosen[METHODS[n]["family"]]["chosen"], "split": "test"} for n, s in plan]

    def save(done: list[dict], skipped: list[dict]) -> None:
        keep = [r for r in previous if (r["method"], r["seed"]) not in {(d["method"], d["seed"]) for d in done}]
        path.write_text(json.dumps({"runs": keep + done, "skipped": skipped}))
    save(*run_all(jobs, base, work, parallel, budget_s, save))


# ----- report ---------------------------------------------------------------------------------------------------
def _stat(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(out_docs: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = json.loads((out_docs / "quality" / "grid.json").read_text())["runs"]
    by_method = {name: found for name in METHODS if (found := [r for r in runs if r["method"] == name])}
    head = ["method", "base", "trainable", "seeds", "lr"] + [f"{t} loss" for t in TASKS] + [f"{t} acc" for t in TASKS] + ["mean acc"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, items in by_method.items():
        cells = [name, items[0]["base"], f"{items[0]['trainable']:,}", str(len(items)), f"{items[0]['lr']:g}"]
        cells += [_stat([r["tasks"][t]["loss"] for r in items]) for t in TASKS]
        cells += [_stat([r["tasks"][t]["accuracy"] for r in items]) for t in TASKS]
        cells += [_stat([r["mean_accuracy"] for r in items])]
        rows.append("| " + " | ".join(cells) + " |")
    curve_rows = ["| method | seeds | train loss @50 | @100 | @200 | @300 |", "|---|---|---|---|---|---|"]
    for name in HEADLINE + ["SeLoRA+SRLoRA r16 50%"]:
        items = by_method.get(name, [])
        if items:
            def at(run, step):
                window = [loss for s, loss in run["loss_curve"] if step - 20 < s <= step]
                return statistics.fmean(window)
            curve_rows.append(f"| {name} | {len(items)} | " + " | ".join(_stat([at(r, s) for r in items])
                                                                        for s in (50, 100, 200, MAX_STEPS)) + " |")
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name in ["LoRA r16", "LoRA r8", "SeLoRA r16 50%", "SeLoRA r16 25%", "SRLoRA r16", "SeLoRA+SRLoRA r16 50%",
                 "SeLoRA+DoRA r16 50%", "SeLoRA+PiSSA r16 50%", "QLoRA r16", "QSeLoRA r16 50%"]:
        items = by_method.get(name, [])
        if items:
            steps = [s for s, _ in items[0]["loss_curve"]]
            mean = [statistics.fmean(r["loss_curve"][i][1] for r in items) for i in range(len(steps))]
            smooth = [statistics.fmean(mean[max(0, i - 19):i + 1]) for i in range(len(mean))]
            axis.plot(steps, smooth, label=f"{name} ({len(items)} seed{'s' * (len(items) > 1)})")
    axis.set_xlabel("step"), axis.set_ylabel("training loss (20-step mean, seed mean)"), axis.legend(fontsize=7)
    axis.set_ylim(top=axis.get_ylim()[0] + 1.5)
    figure.tight_layout()
    figure.savefig(out_docs / "quality" / "loss_vs_step.png", dpi=80)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, items in by_method.items():
        x = items[0]["trainable"]
        for axis, key in zip(axes, (lambda r: r["tasks"]["math"]["loss"], lambda r: r["mean_accuracy"])):
            values = [key(r) for r in items]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            axis.errorbar(x, statistics.fmean(values), yerr=spread, fmt="o" if items[0]["base"] == "bf16" else "s",
                          label=name)
    axes[0].set_ylabel("math answer-token loss (test, lower is better)")
    axes[1].set_ylabel("mean generated-answer accuracy (4 tasks)")
    for axis in axes:
        axis.set_xscale("log"), axis.set_xlabel("trainable parameters")
    axes[1].legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(out_docs / "quality" / "accuracy_vs_params.png", dpi=80)
    text = "\n".join(rows) + "\n\n" + "\n".join(curve_rows) + "\n"
    (out_docs / "quality" / "tables.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("prepare", "sweep", "grid", "report", "one"))
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "llm-adapters"))
    parser.add_argument("--base", default=str(ROOT / ".quality" / "base"))
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--work", default="/tmp/selora_quality")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--budget-seconds", type=float, default=420, help="start no new run after this long")
    parser.add_argument("--only", default=None, help="grid: comma-separated method names to (re)run")
    parser.add_argument("--method"), parser.add_argument("--seed", type=int), parser.add_argument("--lr", type=float)
    parser.add_argument("--split", choices=("heldout", "test")), parser.add_argument("--run-dir")
    args = parser.parse_args()
    base, out, work = Path(args.base), Path(args.out), Path(args.work)
    if args.command == "prepare":
        prepare(Path(args.source))
    elif args.command == "one":
        one_run(args.method, args.seed, args.lr, args.split, base, Path(args.run_dir))
    elif args.command == "sweep":
        sweep(base, out, work, args.parallel, args.budget_seconds)
    elif args.command == "grid":
        grid(base, out, work, args.parallel, args.budget_seconds, args.only.split(",") if args.only else None)
    else:
        report(out)


if __name__ == "__main__":
    main()
