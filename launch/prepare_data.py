"""Prepare a recipe's data ahead of a (cluster) job: read, check, mix, tokenize and pack it into the cache the
run reads (recipes/data_prepare.py), and print what the run will see.

    python launch/prepare_data.py --recipe llama_selora [key=value ...]

Takes the same recipe and overrides as launch/train.py (only data.*, tokenizer.*, model.path/preset and
train.seed / train.micro_batch_size matter). Prints per-source record and token counts, the length distribution,
what was dropped or cut and why, and the first training example with its masked tokens shown. Run it where the
job's cache is (the same $SELORA_CACHE, on every node for a node-local one); the job then starts without
tokenizing. Bad input ends with one ``error:`` line and exit status 2, as for training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runs from a clone without installing

from launch.config import ConfigError, available_recipes, resolve  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help=f"one of {', '.join(available_recipes())}, or a .yaml path")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.max_length=1024")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import datasets

    from recipes.data_prepare import check_data_config, prepare, report_lines
    from recipes.data_sources import DataError
    from recipes.modeling import ModelLoadError, load_tokenizer
    try:
        config = resolve(args.recipe, args.overrides)
        check_data_config(config.data)
        tokenizer = load_tokenizer(config.tokenizer, config.model)
        datasets.enable_progress_bars()
        prepared = prepare(config.data, tokenizer, int(config.train.seed), int(config.train.micro_batch_size))
    except (ConfigError, DataError, ModelLoadError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(prepared, full=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
