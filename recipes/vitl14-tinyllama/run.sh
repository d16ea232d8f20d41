#!/usr/bin/env bash
# MM-GEM from CLIP ViT-L/14 (224 px) and TinyLlama-1.1B: build, stage 1 on web image-text pairs, stage 2 on regions,
# then the standard benchmarks. Run from the repository root on one node:
#
#   NPROC=8 ENGINE=ddp WEB="cc3m/{00000..00331}.tar::cc12m/{00000..01242}.tar" WEB_WEIGHTS="1::3" \
#   REGIONS="grit/{00000..01999}.tar::vg/region_descriptions.json" REGION_WEIGHTS="4::1" VG_IMAGES=vg/ \
#   bash recipes/vitl14-tinyllama/run.sh
#
# ENGINE: ddp (activation checkpointing, works today), deepspeed (ZeRO-2; the `deepspeed` extra; CPU too) or
# fsdp (FSDP2 through fsdp.json; sharding checked on CPU over gloo, see docs/training.md). The contrastive loss
# always gathers the embeddings of every GPU, so its negatives are the global batch (NPROC x per-device batch).
set -euo pipefail

RECIPE=recipes/vitl14-tinyllama
NPROC=${NPROC:-8}
ENGINE=${ENGINE:-ddp}
OUT=${OUT:-runs/mmgem-vitl14-tinyllama}
STAGE1_SAMPLES=${STAGE1_SAMPLES:-400000000}   # samples seen in stage 1 (resampled shards: an endless stream)
STAGE2_SAMPLES=${STAGE2_SAMPLES:-20000000}
: "${WEB:?set WEB to webdataset shard patterns joined with ::}"
: "${REGIONS:?set REGIONS to region sources (GRIT shards, VG, RefCOCO) joined with ::}"

launch() { torchrun --nproc_per_node "$NPROC" -m mmgem.cli train "$@"; }

# 0. The initial model: pretrained towers, new projections (a complete model folder).
[ -f "$OUT/init/config.json" ] || mmgem-convert --vision-model openai/clip-vit-large-patch14 \
    --language-model TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T --output-dir "$OUT/init"

# 1. Stage 1: image-text contrastive + captioning on web pairs.
launch --args_file "$RECIPE/stage1.args" --args_file "$RECIPE/$ENGINE.args" --model "$OUT/init" \
    --data "$WEB" --data-weights "${WEB_WEIGHTS:-}" --train-num-samples "$STAGE1_SAMPLES" \
    --output-dir "$OUT/stage1" --resume_from_checkpoint "${RESUME:-false}"

# 2. Stage 2: regions join both objectives.
launch --args_file "$RECIPE/stage2.args" --args_file "$RECIPE/$ENGINE.args" --model "$OUT/stage1" \
    --data "$REGIONS" --data-weights "${REGION_WEIGHTS:-}" --image-root "${VG_IMAGES:-}" \
    --train-num-samples "$STAGE2_SAMPLES" --output-dir "$OUT/stage2" --resume_from_checkpoint "${RESUME:-false}"

# 3. Benchmarks (local copies in their published layouts under $BENCH).
BENCH=${BENCH:-benchmarks-data}
mmgem evaluate --model "$OUT/stage2" --benchmark coco flickr30k imagenet coco-captions refcocog urban1k \
    --data-dir "$BENCH/coco" "$BENCH/flickr30k" "$BENCH/imagenet" "$BENCH/coco" "$BENCH/refcocog" "$BENCH/urban1k" \
    --cache-dir "$OUT/eval-cache" --output "$OUT/stage2/benchmarks.json"
