#!/usr/bin/env bash
# The quality study on one lent GPU machine, in calls of under 10 minutes (see docs/quality.md):
#   bash bench/quality_gpu.sh base   # pre-train the base, sweep learning rates, start the grid   (carry .whl .quality)
#   bash bench/quality_gpu.sh grid   # continue the grid from docs/quality/grid.json        (carry .whl .quality/base .quality/data)
# Results land in $OUT (docs/quality/*.json, the base as 15 MB tar pieces, logs); `python bench/quality.py report` renders them.
set -o pipefail
source .whl/install.sh || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/quality_out}
CALL_SECONDS=${CALL_SECONDS:-570}
mkdir -p "$OUT/docs/quality"
cp docs/quality/sweep.json docs/quality/grid.json "$OUT/docs/quality/" 2>/dev/null
if [ "$1" = base ]; then
  python bench/pretrain_base.py --corpus .quality/corpus.txt --out .quality/base --steps 1500 2>&1 | grep -v Writing | tee "$OUT/pretrain.log" || exit 1
  tar c -C .quality base | split -b 15M - "$OUT/base.tar."
  python bench/quality.py sweep --base .quality/base --out "$OUT/docs" --budget-seconds 150 2>&1 | tee "$OUT/sweep.log" || exit 1
fi
budget=$((CALL_SECONDS - SECONDS - 100))
python bench/quality.py grid --base .quality/base --out "$OUT/docs" --budget-seconds $budget 2>&1 | tee "$OUT/grid_$1.log"
# keep one SRLoRA run's own log for the recomposition heatmap (bench/recomposition_heatmap.py)
for run in /tmp/selora_quality/SRLoRA_r16_s1_*_test; do [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$OUT/srlora_r16_s1_metrics.jsonl"; done
