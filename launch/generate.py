"""Try prompts on a base model or a fine-tuned one (greedy answers).

    python launch/generate.py --adapter runs/llama_selora/adapter --prompt "Tom has 3 apples ..." --prompt "..."
    echo "What is 12 times 4?" | python launch/generate.py            # the default base model, prompts from stdin
    python launch/generate.py --chat --prompt "What is the capital of France?"   # through the chat template

A prompt is framed as the training data frames an alpaca instruction (what a model fine-tuned by the recipes
expects); --chat puts it in a user turn of the tokenizer's chat template instead (what an instruct model expects).
The base model is chosen as in launch/evaluate.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runs from a clone without installing

from launch.config import ConfigError  # noqa: E402
from launch.evaluate import add_model_arguments, model_config, user_errors  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); none: one prompt per stdin line")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--chat", action="store_true", help="frame prompts with the tokenizer's chat template")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    try:
        if not prompts:
            raise ConfigError("no prompt: pass --prompt TEXT or write prompts to stdin, one per line")
        import torch
        from recipes.inference import generate, load_for_inference, prompt_ids
        model_cfg, tokenizer_cfg = model_config(args)
        model, tokenizer = load_for_inference(model_cfg, tokenizer_cfg, args.adapter,
                                              torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                                              merge=args.merge)
        answers = generate(model, tokenizer, [prompt_ids(tokenizer, p, chat=args.chat) for p in prompts],
                           args.max_new_tokens)
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for prompt, answer in zip(prompts, answers):
        print(f"### {prompt}\n{answer.strip()}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
