"""A .gguf file de-quantized once: its model and tokenizer kept as a plain Hugging Face folder (float32 safetensors),
so later runs start in a second instead of the ~35 s transformers takes to read SmolLM2-135M's .gguf on a CPU.

The folder is keyed by the file (resolved path, size, modification time) and the transformers version that
converted it, so an edited or replaced file, or a new converter, makes a new entry. Entries are written to a
temporary folder and renamed into place, one process at a time (a lock file): ranks of one launch that all miss the
cache convert once, and a killed conversion leaves nothing a later run would read. Where: ``$SELORA_CACHE/gguf``,
else ``$XDG_CACHE_HOME/selora/gguf``, else ``~/.cache/selora/gguf``; ``model.gguf_cache=false`` reads the .gguf
directly every time. An entry of SmolLM2-135M takes 0.5 GB (float32, what the .gguf de-quantizes to exactly).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

COMPLETE = "selora_gguf_source.txt"  # written last into an entry: which .gguf it was made from


class CacheUnavailable(OSError):
    """The cache folder cannot be created or locked here (a read-only home, a file in its place)."""


def cache_root() -> Path:
    if os.environ.get("SELORA_CACHE"):
        return Path(os.environ["SELORA_CACHE"]) / "gguf"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "selora" / "gguf"


def entry_name(gguf: Path) -> str:
    import transformers
    resolved = gguf.resolve()
    stat = resolved.stat()
    key = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|transformers {transformers.__version__}"
    return f"{resolved.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def cached_checkpoint(gguf: Path, convert: Callable[[Path, Path], None]) -> Path:
    """The folder holding ``gguf`` as a Hugging Face checkpoint (config, safetensors, tokenizer), made by
    ``convert(gguf, folder)`` on the first call."""
    root = cache_root()
    entry = root / entry_name(gguf)
    if (entry / COMPLETE).is_file():
        return entry
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "a")
    except OSError as error:
        raise CacheUnavailable(f"{root}: {error.strerror or error}") from None
    with lock, _locked(lock):
        if (entry / COMPLETE).is_file():  # another process made it while this one waited
            return entry
        for stale in root.glob(f".{entry.name}.*"):  # staging folders of conversions that were killed
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
        try:
            convert(gguf, staging)
            (staging / COMPLETE).write_text(f"{gguf.resolve()}\n")
            if entry.exists():  # an entry without its marker: left by a copy interrupted outside selora
                shutil.rmtree(entry)
            staging.rename(entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return entry


@contextmanager
def _locked(handle):
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
