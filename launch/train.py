"""selora's one entry point.

    python launch/train.py --recipe llama_selora [key=value ...]          # one process
    deepspeed launch/train.py --recipe llama_selora                        # all GPUs, ZeRO-2 unless
    deepspeed launch/train.py --recipe llama_selora deepspeed.config=zero3 #   deepspeed.config says otherwise
    torchrun --nproc_per_node 2 launch/train.py --recipe llama_srlora deepspeed.config=zero2
    python launch/train.py --recipe llama_selora --print-config           # show the resolved config

Bad input (unknown recipe, misspelled key, wrong type, missing file, malformed data, ...) ends with one
``error: ...`` line and exit status 2, before any model is loaded; docs/errors.md lists them. A run stopped on
request (train.stop_signals, or the file $SELORA_STOP_FILE) exits with 75 after its checkpoint, and with 76 when
a second signal or train.stop_grace_s cut the stop short (recipes/stop_request.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runs from a clone without installing

# bitsandbytes logs, at import, that an optional CPU kernel package is absent (it falls back to its own
# kernels); that line would sit beside the one-line errors and progress of every run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from launch.config import ConfigError, available_recipes, default_deepspeed, resolve, to_yaml  # noqa: E402


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
    from recipes.checkpoint import CheckpointError
    from recipes.finetune import TrainingDiverged
    from recipes.engine import EngineConfigError
    from recipes.fused_loss import FusedLossConfigError
    from recipes.modeling import ModelLoadError
    from recipes.packed_attention import AttentionConfigError
    from recipes.shared_build import BuildFailed
    from recipes.validate import RecipeConfigError
    return (ConfigError, RecipeConfigError, DataError, ModelLoadError, CheckpointError, EngineConfigError,
            selora.ConfigValueError, selora.TargetModuleError, selora.AdapterFileError, FileNotFoundError,
            TrainingDiverged, BuildFailed, AttentionConfigError, FusedLossConfigError)


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
    # Launchers (deepspeed, torchrun) set WORLD_SIZE; decided before anything is loaded or printed.
    note = default_deepspeed(config, int(os.environ.get("WORLD_SIZE", "1")))
    if note and os.environ.get("RANK", "0") == "0":
        print(note, flush=True)
    from recipes import finetune
    from recipes.stop_request import RESUME_FILE_ENV, STOPPED, Stopped
    try:
        finetune.run(config)
        code = 0
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except Stopped as stopped:  # a signal or the batch script's stop file; a checkpoint was written
        if os.environ.get("RANK", "0") == "0":
            print(stopped, flush=True)
            stopped.leave_resume_note(os.environ.get(RESUME_FILE_ENV))  # train.sbatch requeues the job on it
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()  # no rank exits (and gets the others killed by the launcher) before the note exists
        code = STOPPED
    # Every way out that all ranks take together leaves the process group; a crash does not reach here (its peers
    # may still wait in a collective, and the launcher ends them).
    finetune.leave_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
