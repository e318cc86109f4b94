"""launch/recomposition_heatmap.py reads a run's SRLoRA events and draws them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch import recomposition_heatmap as heatmap

ROOT = Path(__file__).resolve().parents[1]


def write_run(run_dir: Path, events_by_step: dict[int, list[dict]]) -> Path:
    run_dir.mkdir()
    lines = [{"step": 1, "loss": 2.0}] + [{"step": s, "loss": 1.0, "srlora": e} for s, e in events_by_step.items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return run_dir


def test_matrix_places_every_fusion(tmp_path):
    run = write_run(tmp_path / "run", {
        10: [{"step": 10, "layer": "l0.q", "pairs": [3], "directions": [0]},
             {"step": 10, "layer": "l1.q", "pairs": [0, 2], "directions": [0, 1]}],
        20: [{"step": 20, "layer": "l0.q", "pairs": [1], "directions": [1]}]})
    layers, steps, cells = heatmap.fusion_matrix(heatmap.read_events(run))
    assert layers == ["l0.q", "l1.q"] and steps == [10, 20]
    assert cells == [[[3], [1]], [[0, 2], []]]
    out = heatmap.draw(run, tmp_path / "map.png")
    assert out.stat().st_size > 5000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_recompositions_is_a_clear_error(tmp_path):
    run = write_run(tmp_path / "plain", {})
    result = subprocess.run([sys.executable, "-m", "launch.recomposition_heatmap", str(run)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "records no recomposition" in result.stderr
    with pytest.raises(SystemExit, match="not found"):
        heatmap.read_events(tmp_path / "nowhere")
