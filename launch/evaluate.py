"""Accuracy and answer loss of a base model, or of a base with a selora / PEFT adapter, on LLM-Adapters-style tasks.

    python launch/evaluate.py --task addsub=AddSub/test.json                        # the default base model
    python launch/evaluate.py --adapter runs/llama_selora/adapter --task addsub=AddSub/test.json --out r.json
    python launch/evaluate.py --adapter runs/x/peft_adapter --model-preset tiny_llama --task boolq=boolq.json
    torchrun --nproc_per_node 4 launch/evaluate.py --adapter DIR --task ... # each rank scores a shard

A task file holds alpaca records (instruction, input, output) with a gold ``answer``: numbers make a math task
(greedy answer, the number after "The answer is", tolerance 1e-3 absolute or 1e-4 relative), labels such as
true/false or answer1..answer5 a multiple-choice one (the label whose answer text is most likely). Both report
the mean answer loss per target token as well (recipes/evaluation.py). The base model is --model-path /
--model-preset when given, else the one the adapter recorded, else the recipes' default (configs/defaults.yaml).

Bad input (missing file, malformed record, unknown adapter dir) ends with one ``error: ...`` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runs from a clone without installing

from launch.config import ConfigError, resolve  # noqa: E402

DEFAULT_RECIPE = "llama_selora"  # its model section is the recipes' default model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="a selora adapter dir (runs/<recipe>/adapter) or a PEFT adapter dir")
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--model-path", help="base model: HF checkpoint folder or .gguf (default: the adapter's own)")
    base.add_argument("--model-preset", help="base model: a preset of configs/models/ (e.g. tiny_llama)")
    parser.add_argument("--quantization", choices=["none", "4bit", "8bit"], default="none")
    parser.add_argument("--merge", action="store_true",
                        help="write the adapter into the base weights first (float bases): generation then runs at "
                             "the base model's speed, and the outputs equal the unmerged ones up to the base dtype's "
                             "rounding")


def model_config(args):
    """(model section, tokenizer section) of the base: the flags, else what the adapter recorded, else default."""
    from recipes.inference import adapter_kind, recorded_base
    recorded = {}
    if args.adapter:
        adapter_kind(args.adapter)  # an unusable adapter dir fails here, before any loading
        recorded = recorded_base(args.adapter)
    overrides = [f"model.quantization={args.quantization}"]
    if args.model_path:
        overrides.append(f"model.path={args.model_path}")
    elif args.model_preset:
        overrides.append(f"model.preset={args.model_preset}")
    elif recorded.get("path"):
        overrides.append(f"model.path={recorded['path']}")
    elif recorded.get("preset"):
        overrides += [f"model.preset={recorded['preset']}", f"model.seed={recorded.get('seed', 0)}"]
    cfg = resolve(DEFAULT_RECIPE, overrides)
    if args.merge and args.quantization != "none":
        raise ConfigError(f"--merge with --quantization {args.quantization}: merging re-quantizes the base (another "
                          "model); drop --merge, or evaluate on the float base")
    return cfg.model, cfg.tokenizer


def model_name(model_cfg) -> str:
    return str(model_cfg.path) if model_cfg.path else f"preset:{model_cfg.preset}"


def user_errors() -> tuple[type[BaseException], ...]:
    import selora
    from recipes.data import DataError
    from recipes.inference import InferenceError
    from recipes.modeling import ModelLoadError
    return (ConfigError, DataError, InferenceError, ModelLoadError, selora.AdapterFileError, selora.ConfigValueError,
            FileNotFoundError)


def parse_tasks(items: list[str]) -> list[tuple[str, str]]:
    tasks = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--task {item!r} is not NAME=FILE (e.g. --task addsub=data/AddSub/test.json)")
        tasks.append((name, path))
    names = [n for n, _ in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"--task names must be unique, got {names}")
    return tasks


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--task", action="append", required=True, metavar="NAME=FILE",
                        help="a task: alpaca JSON/JSONL records with an 'answer' field (repeatable)")
    parser.add_argument("--max-records", type=int, default=None, help="at most N records per task (seeded sample)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows scored at once (log-likelihoods)")
    parser.add_argument("--generate-batch-size", type=int, default=None,
                        help="prompts generated at once for math tasks (default: --batch-size; can be several times "
                             "larger, generation keeps only the last position's logits)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="generation length for math tasks")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def setup_distributed():
    """(rank, world_size, device); a process group only under a launcher (torchrun sets WORLD_SIZE)."""
    import torch
    import torch.distributed as dist
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return (dist.get_rank() if world_size > 1 else 0), world_size, device


def run(args) -> dict:
    import torch
    from recipes.evaluation import evaluate_task, load_task
    from recipes.inference import load_for_inference

    for flag in ("max_records", "batch_size", "generate_batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}={value}: must be at least 1")
    # Everything that can be wrong with the input is checked before the model is loaded.
    tasks = [load_task(name, path, args.max_records, args.seed) for name, path in parse_tasks(args.task)]
    model_cfg, tokenizer_cfg = model_config(args)
    rank, world_size, device = setup_distributed()
    torch.manual_seed(args.seed)
    model, tokenizer = load_for_inference(model_cfg, tokenizer_cfg, args.adapter, device, merge=args.merge)
    report = {"model": model_name(model_cfg), "adapter": args.adapter, "quantization": args.quantization, "tasks": {}}
    for task in tasks:
        result = evaluate_task(model, tokenizer, task, args.batch_size, args.max_new_tokens, rank, world_size,
                               generate_batch_size=args.generate_batch_size)
        report["tasks"][task.name] = result
        if rank == 0:
            print(f"{task.name}: {result['kind']} accuracy {result['accuracy']:.4f} (n={result['n']}) "
                  f"answer_loss {result['answer_loss']:.4f} in {result['seconds']:.1f}s", flush=True)
    if rank == 0 and args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
        code = 0
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    leave_process_group()  # not after a crash: peers may still wait in a collective, and the launcher ends them
    return code


def leave_process_group() -> None:
    """A process group left to the interpreter's exit can abort it (gloo; see recipes/finetune.leave_process_group)."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
