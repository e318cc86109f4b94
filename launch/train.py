"""selora's one entry point.

    python launch/train.py --recipe llama_selora [key=value ...]          # one process
    deepspeed launch/train.py --recipe llama_selora deepspeed.config=zero3 # many GPUs / nodes
    torchrun --nproc_per_node 2 launch/train.py --recipe llama_srlora deepspeed.config=zero2
    python launch/train.py --recipe llama_selora --print-config           # show the resolved config

Bad input (unknown recipe, misspelled key, wrong type, missing file, malformed data, ...) ends with one
``error: ...`` line and exit status 2, before any model is loaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runs from a clone without installing

from launch.config import ConfigError, available_recipes, resolve, to_yaml  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help=f"one of {', '.join(available_recipes())}, or a .yaml path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    return parser.parse_args(argv)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (reported in one line), not a bug (reported with a traceback)."""
    import selora
    from recipes.data import DataError
    from recipes.modeling import ModelLoadError
    errors = [ConfigError, DataError, ModelLoadError, selora.ConfigValueError, selora.TargetModuleError,
              selora.AdapterFileError, FileNotFoundError]
    try:
        from recipes.checkpoint import CheckpointError
        errors.append(CheckpointError)
    except ImportError:
        pass
    try:
        from recipes.engine import EngineConfigError
        errors.append(EngineConfigError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = resolve(args.recipe, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    from recipes import finetune
    try:
        finetune.run(config)
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
