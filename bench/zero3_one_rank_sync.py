"""How much of ZeRO-3's one-GPU gap to the plain engine is one stream synchronisation per gathered layer?

At a partition of one rank DeepSpeed 0.19.8 fetches a unit's weights through a ``NoGatherCoalescedHandle``, whose
``wait()`` synchronises the whole current stream although nothing was copied (the weights already live on the
device): about 46 synchronisations a step at the 1.3B shape (docs/benchmarks/recipe_vs_peft_2026-12-06.md), each
one leaving the host unable to run ahead of the device. This script times, in interleaved rounds, the recipe's
plain engine, ZeRO-3 as shipped, and ZeRO-3 in a training process whose ``NoGatherCoalescedHandle.wait`` marks the
weights available without that synchronisation (`no_sync_entry.py`; a diagnosis, not the recipe: with
``offload_param`` the fetch is a host-to-device copy and the wait is not to be skipped).

    python bench/zero3_one_rank_sync.py --rounds 2 --out $OUT      # one GPU call, the 1.3B shape by default
    python bench/zero3_one_rank_sync.py --smoke --rounds 1          # CPU, tiny

Writes docs/benchmarks/zero3_one_rank_sync_<date>.{json,md}: each variant's tokens/s per round and, within each
round, the ZeRO-3 variants over the plain engine.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from common import argument_parser, interleaved_rounds, median_range, pick_device, write_results
from recipe_vs_peft import PF, add_row_arguments, recipe_row

NO_SYNC_ENTRY = str(Path(__file__).with_name("no_sync_entry.py"))
VARIANTS = {  # name: (engine, entry point)
    "plain engine": ("plain", "launch/train.py"),
    "ZeRO-3": ("zero3", "launch/train.py"),
    "ZeRO-3 without the one-rank synchronisation": ("zero3", NO_SYNC_ENTRY),
}


def markdown(device: str, args, results: dict, ratios: dict) -> str:
    lines = [f"# ZeRO-3 on one GPU with and without DeepSpeed's one-rank synchronisation ({device})", "",
             f"`bench/zero3_one_rank_sync.py`: recipe LoRA, {args.shape} {args.batch}x{args.seq}, padding-free, "
             f"gradient checkpointing, {args.steps} timed steps after {args.warmup}, {args.rounds} interleaved "
             "rounds (shuffled order); ratios within a round, medians [range] over the rounds.", "",
             "| variant | tokens/s | x plain engine |", "|---|---|---|"]
    for name, speeds in results.items():
        middle, low, high = median_range(speeds)
        ratio = "1.00" if name == "plain engine" else "{:.2f} [{:.2f}-{:.2f}]".format(*median_range(ratios[name]))
        lines.append(f"| {name} | {middle:,.0f} [{low:,.0f}-{high:,.0f}] | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__)
    add_row_arguments(parser, steps=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny preset, few steps")
    args = parser.parse_args(argv)
    args.breakdown = False
    if args.smoke:
        args.shape, args.batch, args.seq, args.steps, args.warmup, args.rank = "tiny_llama", 2, 256, 2, 1, 8
    device, _, device_name = pick_device()
    with tempfile.TemporaryDirectory() as work:
        def run(name: str):
            engine, entry = VARIANTS[name]
            row = recipe_row(args, "llama_lora", engine, "lora", [PF], Path(work) / name.replace(" ", "_"),
                             entry=entry)
            if "error" in row:
                raise RuntimeError(f"{name}: {row['error']}")
            print(f"{name}: {row['tokens_per_s']:,.0f} tokens/s", flush=True)
            return row["tokens_per_s"]

        results = interleaved_rounds({name: (lambda name=name: run(name)) for name in VARIANTS}, args.rounds)
    plain = results["plain engine"]
    ratios = {name: [speed / base for speed, base in zip(speeds, plain)]
              for name, speeds in results.items() if name != "plain engine"}
    question = "zero3_one_rank_sync_smoke" if args.smoke else "zero3_one_rank_sync"
    text = markdown(device_name, args, results, ratios)
    write_results(args.out, question, text, {"shape": f"{args.shape} {args.batch}x{args.seq}", "rounds": args.rounds,
                                             "tokens_per_s": results, "ratio_to_plain_engine": ratios}, device_name)
    print(text)
    return {"tokens_per_s": results, "ratio_to_plain_engine": ratios}


if __name__ == "__main__":
    main()
