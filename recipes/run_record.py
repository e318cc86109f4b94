"""The run's record in output_dir, written by global rank 0 when training starts (each file atomically):

    config.yaml     the resolved config exactly as it ran; `python launch/train.py --recipe <output_dir>/config.yaml`
                    reruns it (add train.output_dir=<new> to run it elsewhere)
    run_info.json   installed versions of the main packages, python, the git commit of the source tree (with a
                    dirty flag) when it is a checkout, the command line, the world size, the start time, and the
                    checkpoint the run resumed from (null for a fresh start)

A resumed run writes both again: they describe the latest start, the one whose exports end up in output_dir.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from recipes.checkpoint import write_text_atomically

CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
PACKAGES = ("torch", "transformers", "deepspeed", "bitsandbytes", "datasets", "peft", "selora")
SOURCE = Path(__file__).resolve().parents[1]


def write_run_record(output_dir: str | Path, cfg, rank: int, world_size: int, resumed_from: Path | None) -> None:
    """config.yaml and run_info.json in ``output_dir`` (global rank 0 writes; other ranks return at once)."""
    if rank != 0:
        return
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    info = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": [sys.executable, *sys.argv], "world_size": world_size,
            "resumed_from": str(resumed_from) if resumed_from is not None else None,
            "python": platform.python_version(), "packages": package_versions(), "source": source_commit(SOURCE)}
    write_text_atomically(output_dir / RUN_INFO_FILE, json.dumps(info, indent=2) + "\n")


def package_versions() -> dict[str, str | None]:
    """{distribution: installed version, or None when it is not installed}."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_commit(root: Path) -> dict | None:
    """{"commit": HEAD's hash, "dirty": whether tracked files differ from it} of the git checkout whose top folder
    is ``root``; None where it is not one or git is not there. An installed copy (site-packages) is None even
    inside some other repository, as a virtual environment within a project's checkout is: that HEAD is not
    the source that ran."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != Path(root).resolve():
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}
