"""Where configs/ is: the defaults, recipes, model presets, DeepSpeed JSON, and the default data and tokenizer.

In a clone (an editable install, or PYTHONPATH) it is the repository's own configs/. A plain ``pip install .``
ships the same folder inside the installed recipes package (pyproject.toml maps configs/ to recipes/configs), so
the launchers run from any folder. Relative data paths in a recipe (``configs/data/...``) resolve under ROOT.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

_INSTALLED = Path(str(files("recipes"))) / "configs"
ROOT = _INSTALLED.parent if _INSTALLED.is_dir() else Path(__file__).resolve().parents[1]  # the folder holding configs/
CONFIGS = ROOT / "configs"
