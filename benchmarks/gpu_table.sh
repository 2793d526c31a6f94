#!/usr/bin/env bash
# The GPU table in one command: every method on ViT-S/16 and ViT-B/16 (random weights: speed
# does not depend on them), bf16 autocast, batch 1, 64 and 256, dense and reduced interleaved in
# one process (`tokenreduce bench`), eager and compiled (one graph, CUDA graphs: the static path,
# so LTMP and AS-ViT with batching=masked), and the official ToMe beside ours.
#
# Run from the repository root on a CUDA machine (torch, timm, safetensors), with a clone of
# facebookresearch/ToMe (not a dependency) in $TOME (default .tome):
#     bash benchmarks/gpu_table.sh          # results in $OUT (default .), one file per run
# A smoke run on the CPU: DEVICE=cpu BATCHES="1 2" MODELS=vit_tiny_patch16_224 AMP= bash ...
set -euo pipefail
out=${OUT:-.}
tome=${TOME:-.tome}
device=${DEVICE:-cuda}
read -r -a batches <<<"${BATCHES:-1 64 256}"
read -r -a models <<<"${MODELS:-vit_small_patch16_224 vit_base_patch16_224}"
amp=${AMP---amp}
static=(
  --method tome:r=13 --method evit:keep_rate=0.7 --method topk:keep_rate=0.7 --method ppt
  --method bat --method ltmp:merge_thresholds=0.95,prune_thresholds=0.005,batching=masked
  --method asvit:thresholds=0.6,batching=masked
)
ragged=(--method ltmp:merge_thresholds=0.95,prune_thresholds=0.005 --method asvit:thresholds=0.6)
for model in "${models[@]}"; do
  common=(-m "$model" --weights random --device "$device" $amp -b "${batches[@]}"
    --num-warm-iter 3 --num-bench-iter 20 --results-format json)
  python3 -m tokenreduce bench "${common[@]}" "${static[@]}" "${ragged[@]}" \
    --results-file "$out/gpu_${model}_eager.json"
  python3 -m tokenreduce bench "${common[@]}" "${static[@]}" --compile \
    --results-file "$out/gpu_${model}_compiled.json"
  for batch in "${batches[@]}"; do
    python3 benchmarks/tome_official.py "$tome" "$model" 13 --device "$device" $amp \
      --batch-size "$batch" --rounds 20 | tee -a "$out/tome_official_${model}.txt"
  done
done
