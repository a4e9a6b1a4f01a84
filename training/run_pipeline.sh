#!/usr/bin/env bash
# The KaLM-V2 recipe, stage by stage (METHOD.md §4). Stages chain by paths: outputs/stageN/final.
# Multi-GPU: LAUNCH="torchrun --nproc_per_node 8" training/run_pipeline.sh  (extra args go to every stage)
set -euo pipefail
LAUNCH=${LAUNCH:-}
KALM="${LAUNCH:+$LAUNCH $(command -v kalm-st)}"; KALM=${KALM:-kalm-st}
$KALM train training/configs/stage1_pretrain.yaml "$@"
# curate stage-2/3 data with the stage-1 model here (kalm-st mine / filter / label / teacher-score)
$KALM train training/configs/stage2_finetune.yaml "$@"
$KALM train training/configs/stage3_distill.yaml "$@"
kalm-st train training/configs/soup.yaml
