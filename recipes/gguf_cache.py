"""A .gguf file de-quantized once: its model and tokenizer kept as a plain Hugging Face folder (float32 safetensors),
so later runs start in a second instead of the ~40 s transformers takes to read SmolLM2-135M's .gguf on a CPU (the
conversion itself, recipes/modeling._convert_gguf, takes about 20 s: it parses the file once).

The folder is keyed by the file (resolved path, size, modification time) and the transformers version that
converted it, so an edited or replaced file, or a new converter, makes a new entry. It is made through
recipes/shared_build.py: one process per node converts (under a file lock, into a staging folder renamed into
place), the others wait, and an entry is used only when its manifest checks out (config, weights and tokenizer,
with their sizes); anything less is rebuilt with one warning line. Where: ``$SELORA_CACHE/gguf``, else
``$XDG_CACHE_HOME/selora/gguf``, else ``~/.cache/selora/gguf``; ``model.gguf_cache=false`` reads the .gguf
directly every time. An entry of SmolLM2-135M takes 0.5 GB (float32, what the .gguf de-quantizes to exactly).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from recipes.shared_build import build_once

# What a converted entry must hold to be used: the model's config and weights and the tokenizer.
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


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
    ``convert(gguf, folder)`` on the first call. Under torch.distributed every rank must call it together."""
    return build_once(cache_root() / entry_name(gguf), lambda folder: convert(gguf, folder),
                      what=f"the de-quantized copy of {gguf.name}", required=REQUIRED, scope="node")
