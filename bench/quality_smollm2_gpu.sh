#!/usr/bin/env bash
# One study call on the GPU machine (bench/README_quality_gpu.md has the whole sequence of calls):
#   bash bench/gpu_model_parts.sh receive && bash bench/quality_smollm2_gpu.sh
# Installs the carried wheels, de-quantizes the joined GGUF into an HF folder once (kept in /tmp while the machine
# stays warm), then runs the study (bench/quality_smollm2.py run) until CALL_SECONDS minus a margin: the sweep
# first, then the grid; a later call continues where this one stopped. Results come back in $OUT:
# results.jsonl (every finished run), runs.tar.gz (metrics, eval reports, logs), study_*.log.
# Environment: CALL_SECONDS (default 520: the whole call, wheels and conversion included), PARALLEL (default 8),
# STUDY_ARGS (extra arguments for `run`, e.g. "--only 'LoRA r16,SRLoRA r16 (paper)'" or "--steps 150"),
# STUDY_COMMAND=plan (list the runs and check every config, run nothing: a dry run of the call).
set -o pipefail
START=$SECONDS
source .whl/install.sh || exit 1
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
OUT=${OUT:-/tmp/smollm2_out}
CALL_SECONDS=${CALL_SECONDS:-520}
MODEL_DIR=${SMOLLM2_DIR:-/tmp/smollm2}
GGUF=$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
HF=$MODEL_DIR/hf
WORK=${STUDY_WORK:-/tmp/smollm2_study}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
echo "cpus: $(nproc); wheels installed at $((SECONDS - START)) s"
if [ ! -f "$HF/config.json" ]; then
  python bench/quality_smollm2.py convert-model --gguf "$GGUF" --out "$HF" 2>&1 | grep -v "it/s]" | tee "$OUT/convert.log" || exit 1
fi
[ -f "$HF/config.json" ] || { echo "error: no converted model in $HF (did convert-model fail?)"; exit 1; }
budget=$((CALL_SECONDS - (SECONDS - START) - 45))
echo "study budget: $budget s (runs that would end later are left for the next call)"
eval python bench/quality_smollm2.py "${STUDY_COMMAND:-run}" --model-path "$HF" --work "$WORK" --out "$OUT" \
  --parallel "${PARALLEL:-8}" --budget-seconds "$budget" --hard-seconds "$((budget + 30))" "${STUDY_ARGS:-}" \
  2>&1 | tee "$OUT/study_$(date +%H%M%S).log"
echo "call done at $((SECONDS - START)) s"
