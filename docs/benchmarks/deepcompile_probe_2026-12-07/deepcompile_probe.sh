#!/usr/bin/env bash
# DeepSpeed's DeepCompile on one GPU, weighed for issue 27's "ZeRO-3 on one GPU >= 0.95x the plain engine": ZeRO-3's
# per-module Python hooks (the host time docs/benchmarks/zero3_7b_profile_2026-12-07 shows) replaced by graph
# passes. First a direct recipe run (its log says whether DeepCompile builds its op and trains), then
# bench/recipe_vs_peft.py rows: the plain engine, ZeRO-3, ZeRO-3 with DeepCompile, at SHAPE.
# Kept as the record of call M (2026-12-07): it ran from bench/ with engine_switch.diff applied (the switch that
# calls DeepSpeed's engine.compile() and the row it times); DeepCompile failed, so neither is in the tree.
# On the GPU machine:  source .whl/install.sh && bash bench/deepcompile_probe.sh "$OUT" [SHAPE BATCH SEQ BUDGET_S]
set -uo pipefail
out="${1:?a folder for the logs and tables}"
shape="${2:-llama_1b_bench}" batch="${3:-8}" seq="${4:-256}" budget="${5:-330}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
started=$SECONDS
deepcompile='deepspeed.overrides={optimizer: {params: {torch_adam: true, adam_w_mode: true}}, compile: {deepcompile: true}}'
timeout 240 python launch/train.py --recipe llama_lora "model.preset=$shape" model.path=null model.compile=false \
  model.gradient_checkpointing=true train.max_steps=10 "train.micro_batch_size=$batch" \
  train.gradient_accumulation_steps=1 "data.max_length=$seq" data.padding_free=true data.packing=false \
  train.eval_every=0 train.save_every=0 train.export_peft=false train.log_every=1 train.warmup_steps=0 \
  train.sample_prompts=[] train.overwrite=true deepspeed.config=zero3 "$deepcompile" \
  train.output_dir=/tmp/deepcompile_probe > "$out/deepcompile_${shape}_run.log" 2>&1
echo "direct DeepCompile run at $shape: exit $? after $((SECONDS - started)) s"
grep -v -i "warn" "$out/deepcompile_${shape}_run.log" | tail -n 8
cp /tmp/deepcompile_probe/metrics.jsonl "$out/deepcompile_${shape}_metrics.jsonl" 2>/dev/null
rows='recipe plain LoRA (padding-free),recipe ZeRO-3 LoRA (padding-free),recipe ZeRO-3 LoRA (padding-free DeepCompile)'
python bench/recipe_vs_peft.py --out "$out" --no-trainer --rows "$rows" --shape "$shape" --batch "$batch" \
  --seq "$seq" --steps 8 --warmup 4 --budget $((budget - (SECONDS - started)))
