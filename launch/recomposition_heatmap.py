"""Which pairs of which layers SRLoRA fused, and when: a heatmap from a run's own metrics.jsonl.

    python -m launch.recomposition_heatmap runs/llama_srlora    # writes runs/llama_srlora/recompositions.png
    python -m launch.recomposition_heatmap RUN_DIR --out picture.png

Rows are adapted layers (in model order), columns the recomposition steps; a cell shows which pair slots were
fused at that step (the pair index, or several). A second panel counts fusions per pair slot over the run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_events(run_dir: Path) -> list[dict]:
    """SRLoRA events ({step, layer, pairs, directions}) from RUN_DIR/metrics.jsonl, in logged order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; pass a run directory (train.output_dir) of an SRLoRA run")
    events = [e for line in path.read_text().splitlines() if line.strip() for e in json.loads(line).get("srlora", [])]
    if not events:
        raise SystemExit(f"error: {path} records no recomposition; was srlora.enabled=true and did the schedule fire?")
    return events


def fusion_matrix(events: list[dict]) -> tuple[list[str], list[int], list[list[list[int]]]]:
    """(layers, steps, cells[layer][step] = fused pair indices)."""
    layers = list(dict.fromkeys(e["layer"] for e in events))
    steps = sorted({e["step"] for e in events})
    cells = [[[] for _ in steps] for _ in layers]
    for e in events:
        cells[layers.index(e["layer"])][steps.index(e["step"])] += e["pairs"]
    return layers, steps, cells


def draw(run_dir: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, steps, cells = fusion_matrix(read_events(run_dir))
    rank = 1 + max(p for row in cells for cell in row for p in cell)
    first = np.array([[cell[0] if cell else np.nan for cell in row] for row in cells], dtype=float)
    counts = np.zeros((len(layers), rank))
    for i, row in enumerate(cells):
        for cell in row:
            for pair in cell:
                counts[i, pair] += 1
    height = max(3.0, 0.22 * len(layers) + 1.5)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, height), gridspec_kw={"width_ratios": [3, 2]})
    image = left.imshow(first, aspect="auto", cmap="viridis", vmin=0, vmax=rank - 1, interpolation="nearest")
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            if len(cell) > 1:
                left.text(j, i, ",".join(map(str, cell)), ha="center", va="center", fontsize=6, color="white")
    left.set_xticks(range(len(steps)), [str(s) for s in steps])
    left.set_yticks(range(len(layers)), layers, fontsize=6)
    left.set_xlabel("recomposition step")
    left.set_title("pair fused (colour = pair index)")
    figure.colorbar(image, ax=left, label="pair")
    counts_image = right.imshow(counts, aspect="auto", cmap="magma", interpolation="nearest")
    right.set_xticks(range(rank))
    right.set_yticks([])
    right.set_xlabel("pair slot")
    right.set_title("fusions per pair slot")
    figure.colorbar(counts_image, ax=right, label="times fused")
    figure.suptitle(f"SRLoRA recompositions: {run_dir}")
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    print(draw(run_dir, Path(args.out) if args.out else run_dir / "recompositions.png"))


if __name__ == "__main__":
    main()
