#!/usr/bin/env bash
# Issue 14's GPU calls (one H200): the recipe vs the PEFT loop, with profiles of the rows that miss their targets.
# Run on the GPU machine from the repository root after `source .whl/install.sh`; everything goes to $OUT.
#
#   bash bench/gpu_issue14.sh diagnose   # 1.3B: plain/SRLoRA/ZeRO-2/ZeRO-3 rows + ZeRO-2 and ZeRO-3 tuning rows, profiles
#                                        # (run 2026-12-02 before the config changes, when overlap_comm was on by default)
#   bash bench/gpu_issue14.sh confirm    # 1.3B: the same rows with the tuned ZeRO configs and cheaper SRLoRA scoring
#   bash bench/gpu_issue14.sh quantized  # 1.3B: 4-bit LoRA vs SRLoRA after the residual change, plain LoRA beside, 3 interleaved rounds
#   bash bench/gpu_issue14.sh 7b ROWS    # 7B (4 x 1024): the given comma-separated rows
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
case "${1:-}" in
  diagnose)
    python bench/recipe_vs_peft.py --shape llama_1b_bench --batch 8 --seq 256 --steps 15 --out "$OUT" --budget 300 \
      --rows "recipe plain LoRA (padding-free),recipe plain SRLoRA (padding-free),recipe ZeRO-2 LoRA (padding-free),recipe ZeRO-2 LoRA (padding-free overlap_comm on),recipe ZeRO-2 LoRA (padding-free no overlap_comm one bucket),recipe ZeRO-3 LoRA (padding-free granularity threshold 1e7 deep prefetch)" \
      --profile "recipe plain SRLoRA (padding-free),recipe ZeRO-2 LoRA (padding-free),recipe ZeRO-3 LoRA (padding-free granularity threshold 1e7)" ;;
  confirm)
    python bench/recipe_vs_peft.py --shape llama_1b_bench --batch 8 --seq 256 --steps 15 --out "$OUT" --budget 330 \
      --rows "recipe plain LoRA (padding-free),recipe plain SRLoRA (padding-free),recipe ZeRO-2 LoRA (padding-free),recipe ZeRO-3 LoRA (padding-free),recipe ZeRO-3 LoRA (padding-free granularity threshold 1e7),recipe plain 4-bit LoRA (padding-free),recipe plain 4-bit SRLoRA (padding-free)" \
      --profile "recipe ZeRO-3 LoRA (padding-free)" ;;
  quantized)  # first run (one round, with a profile) 2026-12-02 fourth session: docs/benchmarks/recipe_vs_peft_4bit_one_round.md
    python bench/recipe_vs_peft.py --shape llama_1b_bench --batch 8 --seq 256 --steps 15 --out "$OUT" --budget 430 \
      --rounds 3 --rows "recipe plain 4-bit LoRA (padding-free),recipe plain 4-bit SRLoRA (padding-free),recipe plain LoRA (padding-free)" ;;
  7b)
    python bench/recipe_vs_peft.py --shape llama2_7b --batch 4 --seq 1024 --steps 15 --out "$OUT" --budget "${BUDGET:-420}" --rows "$2" ;;
  *) echo "usage: $0 diagnose | confirm | 7b ROWS" >&2; exit 2 ;;
esac
