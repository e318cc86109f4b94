"""Folders that several processes share, made once: one named process builds, the others wait, all verify.

The rule for everything ranks share on disk (the de-quantized model cache, a tokenized data set): one process
writes it, never a library's idea of the main process (transformers' ``save_pretrained`` writes on global rank 0
only, so a cache built on any other rank came out without its weights). Under torch.distributed the builder is
local rank 0 of each node (``scope="node"``, for node-local caches) or global rank 0 (``scope="global"``); the
other ranks wait in one collective that also carries the builder's outcome, so a failed build fails every rank
instead of leaving them waiting. Builders also take a file lock beside the folder, so separate jobs (or nodes on a
shared file system) build it once between them.

A folder is trusted only when complete: the builder writes into a staging folder, checks that the files the
caller requires are there, writes a manifest of every file with its size last, and renames the staging folder
into place. On every read the manifest is checked; a folder without one, or whose files differ from it (a build
from an older selora, a full disk, a copy interrupted outside selora), is rebuilt with one warning line.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

MANIFEST = "selora_manifest.json"
_BUILT, _UNAVAILABLE, _FAILED = 2, 1, 0  # outcomes, ordered so that the ranks' minimum is the worst one


class BuildUnavailable(OSError):
    """The folder's parent cannot be created or locked here (a read-only home, a file in its place)."""


class BuildFailed(RuntimeError):
    """The build failed on the rank that made it; that rank reported the cause."""


def build_once(target: Path, build: Callable[[Path], None], *, what: str, required: Sequence[str] = (),
               scope: str = "node") -> Path:
    """``target``, complete: reused when its manifest checks out, else made by ``build(staging_folder)`` on the
    builder rank (see the module docstring) and renamed into place. ``required``: paths (relative to the folder)
    the build must have written, or it is an error. Every rank of a process group must call this together."""
    if scope not in ("node", "global"):
        raise ValueError(f"scope must be 'node' or 'global', not {scope!r}")
    target = Path(target)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _build_or_reuse(target, build, what, required)
    builder = _local_rank() == 0 if scope == "node" else dist.get_rank() == 0
    outcome, error = _BUILT, None
    if builder:
        try:
            _build_or_reuse(target, build, what, required)
        except BuildUnavailable as caught:
            outcome, error = _UNAVAILABLE, caught
        except Exception as caught:  # noqa: BLE001 - re-raised below, after the other ranks have been told
            outcome, error = _FAILED, caught
    agreed = torch.tensor([outcome], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    if error is not None:
        raise error
    if agreed.item() == _UNAVAILABLE:
        raise BuildUnavailable(f"{target.parent} cannot be written (reported by the rank that builds {what})")
    if agreed.item() == _FAILED:
        raise BuildFailed(f"{what} could not be made in {target}; the rank that builds it printed why")
    problem = incomplete(target)
    if problem is not None:  # e.g. a node-local folder on a node whose builder saw a different file system
        raise BuildFailed(f"{what} in {target} is not complete on this rank after it was built ({problem})")
    return target


def incomplete(folder: Path) -> str | None:
    """None when ``folder`` holds exactly what its manifest lists (by size), else what is wrong, in words."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "no manifest" if folder.exists() else "missing"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable manifest: {error}"
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def _build_or_reuse(target: Path, build, what: str, required: Sequence[str]) -> Path:
    if incomplete(target) is None:
        return target
    root = target.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "a")
    except OSError as error:
        raise BuildUnavailable(f"{root}: {error.strerror or error}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the build raises
        problem = incomplete(target)
        if problem is None:  # another process made it while this one waited
            return target
        if problem != "missing":
            print(f"warning: {what} in {target} is incomplete ({problem}); rebuilding it", file=sys.stderr,
                  flush=True)
        for stale in root.glob(f".{target.name}.*"):  # staging folders of builds that were killed
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            build(staging)
            missing = [name for name in required if not (staging / name).exists()]
            if missing:
                raise BuildFailed(f"building {what} wrote no {', '.join(missing)} (in {staging})")
            _write_manifest(staging, what)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_manifest(folder: Path, what: str) -> None:
    files = {str(path.relative_to(folder)): path.stat().st_size
             for path in sorted(folder.rglob("*")) if path.is_file()}
    made_by = {"host": socket.gethostname(), "pid": os.getpid(), "rank": os.environ.get("RANK")}
    (folder / MANIFEST).write_text(json.dumps({"what": what, "made_by": made_by, "files": files}, indent=1) + "\n")


def _local_rank() -> int:
    # Every launcher selora supports (deepspeed, torchrun, SLURM via torchrun) sets LOCAL_RANK.
    return int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
