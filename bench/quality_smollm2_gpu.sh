#!/usr/bin/env bash
# One study call on the GPU machine (bench/README_quality_gpu.md has the whole sequence of calls):
#   bash bench/gpu_model_parts.sh receive && bash bench/quality_smollm2_gpu.sh
# Installs the carried wheels, de-quantizes the joined GGUF into an HF folder once (kept in /tmp while the machine
# stays warm), then runs the study (bench/quality_smollm2.py run) until CALL_SECONDS minus a margin: the sweep
# first, then the grid; a later call continues where this one stopped. Results come back in $OUT:
# results.jsonl (every finished run), runs.tar.gz (metrics, eval reports, logs), study_*.log.
# Environment: CALL_SECONDS (default 520: the whole call, wheels and conversion included), PARALLEL (default 8),
# STUDY_ARGS (extra arguments for `run`, e.g. "--only 'LoRA r16,SRLoRA r16 (paper)'" or "--steps 150"),
# STUDY_COMMAND=plan (list the runs and check every config, run nothing: a dry run of the call),
# SPIKE=1 (also run bench/srlora_spike.py twice beside the study, ~2 x 1-3 min of one more process: default and
# PiSSA start; results in $OUT/srlora_spike_*.json and .log).
# DETACH=1: start the study in its own process session (it outlives this call while the machine stays warm) with
# STUDY_SECONDS of budget, return what finished by CALL_SECONDS; a next call within 30 s with COLLECT=1 waits for it
# (at most CALL_SECONDS) and returns results.jsonl, runs.tar.gz and the log (the SRLoRA study: 800-step runs do
# not fit one call). STUDY_ARGS="--study srlora" selects that grid.
set -o pipefail
START=$SECONDS
DETACHED=/tmp/smollm2_detached  # the detached study's --out, log and exit status
if [ -n "${COLLECT:-}" ]; then
  [ -d "$DETACHED" ] || { echo "error: no detached study on this machine (it went cold?): start one with DETACH=1"; exit 1; }
  while [ ! -f "$DETACHED/rc" ] && [ $((SECONDS - START)) -lt "${CALL_SECONDS:-560}" ]; do sleep 5; done
  cp "$DETACHED"/results.jsonl "$DETACHED"/runs.tar.gz "$DETACHED"/study.log "$OUT"/ 2>/dev/null
  tail -n 40 "$DETACHED/study.log"; echo "study exit status: $(cat "$DETACHED/rc" 2>/dev/null || echo 'still running')"
  exit 0
fi
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
python -c "import gguf" 2>/dev/null || { echo "error: no gguf package among the carried wheels (../shared/gpu/wheels.sh does not build it); here run: pip download --no-deps 'gguf>=0.10,<1' -d .whl"; exit 1; }
if [ ! -f "$HF/config.json" ]; then
  python bench/quality_smollm2.py convert-model --gguf "$GGUF" --out "$HF" 2>&1 | grep -v "it/s]" | tee "$OUT/convert.log" || exit 1
fi
[ -f "$HF/config.json" ] || { echo "error: no converted model in $HF (did convert-model fail?)"; exit 1; }
if [ -n "${SPIKE:-}" ]; then  # bench/srlora_spike.py beside the study: the loss after a recomposition, as trained here
  ( for init in default pissa; do
      lr=$([ $init = pissa ] && echo 3e-4 || echo 1e-3)
      timeout 200 python bench/srlora_spike.py --model-path "$HF" --device cuda --dtype bfloat16 --init $init --lr $lr \
        --steps-before 100 --steps-after 10 --micro-batch 16 --max-length 256 --warmup 10 --svd full \
        --out "$OUT/srlora_spike_$init.json" > "$OUT/srlora_spike_$init.log" 2>&1
    done ) &
  SPIKE_PID=$!
fi
budget=$((CALL_SECONDS - (SECONDS - START) - 45))
if [ -n "${DETACH:-}" ]; then
  budget=${STUDY_SECONDS:?DETACH=1 needs STUDY_SECONDS}
  mkdir -p "$DETACHED"
  setsid bash -c "python bench/quality_smollm2.py run --model-path '$HF' --work '$WORK' --out '$DETACHED' \
    --parallel ${PARALLEL:-8} --budget-seconds $budget --hard-seconds $((budget + 30)) ${STUDY_ARGS:-} \
    > '$DETACHED/study.log' 2>&1; echo \$? > '$DETACHED/rc'" < /dev/null > /dev/null 2>&1 &
  echo "study detached, budget $budget s; this call returns at $CALL_SECONDS s"
  while [ $((SECONDS - START)) -lt "$CALL_SECONDS" ] && [ ! -f "$DETACHED/rc" ]; do sleep 5; done
  cp "$DETACHED/results.jsonl" "$OUT/" 2>/dev/null; cp "$DETACHED/study.log" "$OUT/"
  tail -n 30 "$DETACHED/study.log"
  exit 0
fi
echo "study budget: $budget s (runs that would end later are left for the next call)"
eval python bench/quality_smollm2.py "${STUDY_COMMAND:-run}" --model-path "$HF" --work "$WORK" --out "$OUT" \
  --parallel "${PARALLEL:-8}" --budget-seconds "$budget" --hard-seconds "$((budget + 30))" "${STUDY_ARGS:-}" \
  2>&1 | tee "$OUT/study_$(date +%H%M%S).log"
[ -n "${SPIKE_PID:-}" ] && wait "$SPIKE_PID"
echo "call done at $((SECONDS - START)) s"
