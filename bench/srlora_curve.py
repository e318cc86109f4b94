"""LoRA vs SRLoRA loss curves on the default tiny LLaMA (CPU is enough), through the recipe, for the record.

    python bench/srlora_curve.py            # writes docs/srlora_curve.md and docs/srlora_curve.png

No claim is made from this: the base has random weights and the run is short. Quality claims come from the
quality study (bench/quality.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.config import resolve  # noqa: E402
from recipes import finetune  # noqa: E402

COMMON = ["train.max_steps=120", "train.learning_rate=2e-3", "train.save_every=0", "train.eval_every=20",
          "train.tensorboard=false", "train.export_peft=false", "adapter.r=8", "adapter.dropout=0.0",
          "adapter.init=default", "srlora.schedule=fixed", "srlora.start_step=20", "srlora.interval=20", "srlora.end_step=100", "srlora.pairs_per_recomposition=2"]
RUNS = {"LoRA r=8": "llama_lora", "SRLoRA r=8": "llama_srlora", "SeLoRA r=8": "llama_selora",
        "SeLoRA+SRLoRA r=8": "llama_selora_srlora"}


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves, evals, events = {}, {}, {}
    for label, recipe in RUNS.items():
        out = Path("/tmp/selora_curve") / recipe
        finetune.run(resolve(recipe, COMMON + [f"train.output_dir={out}", "train.resume=never", "train.overwrite=true"]))
        lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        curves[label] = [(l["step"], l["loss"]) for l in lines if "loss" in l]
        evals[label] = [(l["step"], l["eval_loss"]) for l in lines if "eval_loss" in l]
        events[label] = sorted({e["step"] for l in lines for e in l.get("srlora", [])})
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        steps, values = zip(*points)
        smooth = [sum(values[max(0, i - 9):i + 1]) / len(values[max(0, i - 9):i + 1]) for i in range(len(values))]
        axis.plot(steps, smooth, label=label)
    for step in events["SRLoRA r=8"]:
        axis.axvline(step, color="grey", linewidth=0.5, linestyle=":")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (10-step mean)")
    axis.set_title("tiny LLaMA (random base), default instruction data; dotted: recompositions")
    axis.legend()
    figure.tight_layout()
    figure.savefig(ROOT / "docs" / "srlora_curve.png", dpi=80)
    rows = ["| run | loss, steps 1-10 | loss, last 10 steps | eval loss (first -> last) | recompositions at |",
            "|---|---|---|---|---|"]
    for label, points in curves.items():
        values = [v for _, v in points]
        rows.append(f"| {label} | {sum(values[:10]) / 10:.4f} | {sum(values[-10:]) / 10:.4f} | "
                    f"{evals[label][0][1]:.4f} -> {evals[label][-1][1]:.4f} | {events[label] or '-'} |")
    text = ("# LoRA vs SRLoRA on the tiny default model (for the record)\n\n"
            f"`python bench/srlora_curve.py`: recipes {', '.join(RUNS.values())} with `{' '.join(COMMON)}`, "
            "one seed, CPU. The base has random weights, so this shows the mechanics (recompositions happen, the "
            "loss does not jump at them), not quality.\n\n" + "\n".join(rows) + "\n\n![curves](srlora_curve.png)\n")
    (ROOT / "docs" / "srlora_curve.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
