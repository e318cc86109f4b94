"""Method quality on real data: LoRA vs SeLoRA vs SRLoRA (and compositions, and a 4-bit base) fine-tuned from a
base pre-trained by bench/pretrain_base.py, on the LLM-Adapters BoolQ / ARC-Easy / OpenBookQA tasks.

    python bench/quality.py prepare --source ../shared/data/llm-adapters   # (dev machine) .quality/data/*.jsonl
    python bench/quality.py run --base .quality/base --out docs            # (GPU) the grid, docs/quality.md + PNGs

Every run goes through the recipe entry point (launch.train.main, in-process). Learning rates are chosen per
method family on a held-out slice of the *training* data; test sets are used only for the final numbers:
eval loss on answer tokens (the recipe's eval) and accuracy of the greedily generated label.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / ".quality" / "data"
TASKS = {"boolq": "boolq", "arc_easy": "ARC-Easy", "openbookqa": "openbookqa"}
TRAIN_PER_TASK, HELDOUT_PER_TASK, TEST_PER_TASK = 1000, 100, 200
COMMON = ["train.max_steps=300", "train.micro_batch_size=16", "train.gradient_accumulation_steps=1",
          "train.warmup_steps=20", "train.save_every=0", "train.eval_every=300", "train.export_peft=false",
          "train.tensorboard=false", "train.resume=never", "data.max_length=384", "data.max_eval_records=null",
          "adapter.dropout=0.0", "srlora.start_step=60", "srlora.interval=60", "srlora.end_step=240",
          "srlora.pairs_per_recomposition=2", "srlora.svd=full"]


def method(recipe, r, family, **extra):
    overrides = [f"adapter.r={r}", f"adapter.alpha={2 * r}"] + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return {"recipe": recipe, "family": family, "overrides": overrides}


METHODS = {
    "LoRA r8": method("llama_lora", 8, "lora"), "LoRA r16": method("llama_lora", 16, "lora"),
    "LoRA r32": method("llama_lora", 32, "lora"),
    **{f"SeLoRA r{r} {int(p * 100)}%": method("llama_selora", r, "selora", adapter__spectral_ratio=p)
       for r, p in ((16, 0.25), (16, 0.5), (16, 1.0), (8, 0.5), (32, 0.5))},
    "SRLoRA r16": method("llama_srlora", 16, "srlora"),
    "SeLoRA+SRLoRA r16 50%": method("llama_selora_srlora", 16, "srlora"),
    "SeLoRA+DoRA r16 50%": method("llama_selora", 16, "selora", adapter__use_dora="true"),
    "SeLoRA+PiSSA r16 50%": method("llama_selora", 16, "selora", adapter__init="pissa"),
    "QLoRA r16 (4-bit)": method("qlora_lora", 16, "lora"),
    "QSeLoRA r16 50% (4-bit)": method("qlora_selora", 16, "selora"),
}
HEADLINE = ["LoRA r16", "SeLoRA r16 50%", "SRLoRA r16"]
LEARNING_RATES = [1e-3, 3e-3, 1e-2]


# ----- data -----------------------------------------------------------------------------------------------------
def prepare(source: Path) -> None:
    rng = random.Random(0)
    DATA.mkdir(parents=True, exist_ok=True)
    train, heldout = [], []
    for task, folder in TASKS.items():
        records = json.loads((source / folder / "train.json").read_text())
        rng.shuffle(records)
        train += records[:TRAIN_PER_TASK]
        heldout += records[TRAIN_PER_TASK:TRAIN_PER_TASK + HELDOUT_PER_TASK]
        test = json.loads((source / folder / "test.json").read_text())
        rng.shuffle(test)
        (DATA / f"test_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test[:TEST_PER_TASK]))
    rng.shuffle(train)
    (DATA / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (DATA / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    print(f"{len(train)} train, {len(heldout)} held-out, {TEST_PER_TASK} test per task -> {DATA}")


# ----- one run ----------------------------------------------------------------------------------------------------
def train_run(name: str, spec: dict, base: Path, seed: int, lr: float, eval_files: list[str], work: Path) -> Path:
    from launch.train import main as launch
    out = work / f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}_s{seed}_lr{lr:g}"
    args = ["--recipe", spec["recipe"], *COMMON, *spec["overrides"], f"model.path={base}", f"tokenizer.path={base}",
            f"data.train_files=[{DATA / 'train.jsonl'}]", f"data.eval_files=[{','.join(eval_files)}]",
            f"train.learning_rate={lr}", f"train.seed={seed}", f"adapter.seed={seed}", f"train.output_dir={out}"]
    if launch(args) != 0:
        raise SystemExit(f"run {name} failed")
    return out


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def parse_label(task: str, text: str) -> str | None:
    text = text.lower()
    found = re.findall(r"\b(true|false)\b" if task == "boolq" else r"answer\s*([1-5])", text)
    if not found:
        return None
    return found[0] if task == "boolq" else f"answer{found[0]}"


def accuracy(out: Path, spec: dict, base: Path) -> tuple[dict, int]:
    """Greedy-generated label accuracy per task, and the run's trainable parameter count."""
    import torch
    import selora
    from launch.config import resolve
    from recipes.data import format_prompt
    from recipes.modeling import load_model, load_tokenizer
    cfg = resolve(spec["recipe"], [*spec["overrides"], f"model.path={base}", f"tokenizer.path={base}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(cfg.model, device)
    selora.load_adapter(model, out / "adapter")
    model.eval()
    trainable = selora.count_parameters(model)["trainable"]
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    scores = {}
    for task in TASKS:
        records = [json.loads(l) for l in (DATA / f"test_{task}.jsonl").read_text().splitlines()]
        correct = 0
        for start in range(0, len(records), 64):
            chunk = records[start:start + 64]
            prompts = [[tokenizer.bos_token_id] + tokenizer(format_prompt(r), add_special_tokens=False)["input_ids"]
                       for r in chunk]
            width = max(map(len, prompts))
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            with torch.no_grad():
                generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for record, row in zip(chunk, generated[:, width:]):
                correct += parse_label(task, tokenizer.decode(row, skip_special_tokens=True)) == record["answer"]
        scores[task] = correct / len(records)
    return scores, trainable


# ----- the grid -------------------------------------------------------------------------------------------------
def run_grid(base: Path, out_docs: Path, work: Path, budget_s: float, chosen_lr: dict | None = None,
             test_records: int | None = None) -> None:
    start = time.time()
    out_docs.mkdir(parents=True, exist_ok=True)
    results_path = out_docs / "quality.json"
    results = {"lr": {}, "runs": []}
    heldout = [str(DATA / "heldout.jsonl")]
    test = [str(DATA / f"test_{t}.jsonl") for t in TASKS]
    if test_records:  # evaluate on the first N records of each test file
        for task in TASKS:
            lines = (DATA / f"test_{task}.jsonl").read_text().splitlines()[:test_records]
            (DATA / f"test_{task}.jsonl").write_text("\n".join(lines) + "\n")
    if chosen_lr:  # learning rates chosen by an earlier held-out sweep (same data, same base recipe)
        results["lr"] = {family: {"chosen": lr, "from": "earlier sweep"} for family, lr in chosen_lr.items()}
    # 1. learning rate per family, on held-out training data
    for family, name in (("lora", "LoRA r16"), ("selora", "SeLoRA r16 50%"), ("srlora", "SRLoRA r16")):
        if family in results["lr"]:
            continue
        losses = {}
        for lr in LEARNING_RATES:
            out = train_run(name, METHODS[name], base, 0, lr, heldout, work)
            losses[lr] = [m["eval_loss"] for m in read_metrics(out) if "eval_loss" in m][-1]
        results["lr"][family] = {"chosen": min(losses, key=losses.get), "heldout_eval_loss": losses}
        print(family, results["lr"][family], flush=True)
    # 2. the headline methods at three seeds first (a time budget then cuts breadth, not seeds), then the rest
    plan = [(n, s) for s in (0, 1, 2) for n in HEADLINE] + [(n, 0) for n in METHODS if n not in HEADLINE]
    for name, seed in plan:
        if time.time() - start > budget_s:
            results.setdefault("skipped", []).append([name, seed])
            continue
        spec = METHODS[name]
        lr = results["lr"][spec["family"]]["chosen"]
        out = train_run(name, spec, base, seed, lr, test, work)
        metrics = read_metrics(out)
        scores, trainable = accuracy(out, spec, base)
        results["runs"].append({"method": name, "seed": seed, "lr": lr, "trainable": trainable,
                                "eval_loss": [m["eval_loss"] for m in metrics if "eval_loss" in m][-1],
                                "accuracy": scores, "mean_accuracy": statistics.fmean(scores.values()),
                                "loss_curve": [(m["step"], m["loss"]) for m in metrics if "loss" in m],
                                "recompositions": [e for m in metrics for e in m.get("srlora", [])]})
        print(name, seed, results["runs"][-1]["eval_loss"], scores, flush=True)
        results_path.write_text(json.dumps(results))
    results["seconds"] = time.time() - start
    results_path.write_text(json.dumps(results))
    report(results, base, out_docs)


def report(results: dict, base: Path, out_docs: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_method: dict[str, list[dict]] = {}
    for run in results["runs"]:
        by_method.setdefault(run["method"], []).append(run)

    def stat(runs, key):
        values = [key(r) for r in runs]
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    rows = ["| method | trainable | seeds | eval loss (test) | BoolQ | ARC-Easy | OBQA | mean accuracy |", "|" + "---|" * 8]
    for name, runs in by_method.items():
        loss = stat(runs, lambda r: r["eval_loss"])
        acc = {t: stat(runs, lambda r, t=t: r["accuracy"][t]) for t in TASKS}
        mean = stat(runs, lambda r: r["mean_accuracy"])
        fmt = lambda m, s: f"{m:.3f} ± {s:.3f}" if len(runs) > 1 else f"{m:.3f}"  # noqa: E731
        rows.append(f"| {name} | {runs[0]['trainable']:,} | {len(runs)} | {fmt(*loss)} | "
                    + " | ".join(fmt(*acc[t]) for t in TASKS) + f" | {fmt(*mean)} |")
    figure, axis = plt.subplots(figsize=(7, 4))
    for name in HEADLINE + ["SeLoRA+SRLoRA r16 50%"]:
        seed0 = [r for r in by_method.get(name, []) if r["seed"] == 0]
        if seed0:
            steps, losses = zip(*seed0[0]["loss_curve"])
            smooth = [statistics.fmean(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
            axis.plot(steps, smooth, label=name)
    axis.set_xlabel("step"), axis.set_ylabel("training loss (10-step mean)"), axis.legend()
    figure.tight_layout()
    (out_docs / "quality").mkdir(parents=True, exist_ok=True)
    figure.savefig(out_docs / "quality" / "loss_vs_step.png", dpi=80)
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, runs in by_method.items():
        mean, spread = stat(runs, lambda r: r["mean_accuracy"])
        axis.errorbar(runs[0]["trainable"], mean, yerr=spread, fmt="o", label=name)
    axis.set_xscale("log"), axis.set_xlabel("trainable parameters"), axis.set_ylabel("mean test accuracy")
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(out_docs / "quality" / "accuracy_vs_params.png", dpi=80)
    (out_docs / "quality_table.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("prepare", "run", "report"))
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "llm-adapters"))
    parser.add_argument("--base", default=str(ROOT / ".quality" / "base"))
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--work", default="/tmp/selora_quality")
    parser.add_argument("--budget-seconds", type=float, default=480)
    parser.add_argument("--lr", default=None, help="reuse chosen learning rates, e.g. lora=3e-3,selora=3e-3,srlora=1e-3")
    parser.add_argument("--test-records", type=int, default=None)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(Path(args.source))
    elif args.command == "run":
        chosen = {k: float(v) for k, v in (item.split("=") for item in args.lr.split(","))} if args.lr else None
        run_grid(Path(args.base), Path(args.out), Path(args.work), args.budget_seconds, chosen, args.test_records)
    else:
        report(json.loads((Path(args.out) / "quality.json").read_text()), Path(args.base), Path(args.out))


if __name__ == "__main__":
    main()
