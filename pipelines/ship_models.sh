#!/usr/bin/env bash
# Train (or resume) the shipped generators, export them with their model cards into
# models/ and quantise their int8 variants. Each `wsi-deepr train` resumes from
# runs/<name>/checkpoint.pt; the checkpoints of the shipped models are kept in
# pipelines/checkpoints/ and copied there first, so a fresh clone continues where the last
# session stopped (raise `iterations` in the config to train longer: the config must
# otherwise match the checkpoint's).
# Needs: pip install -e '.[train]' and ../shared/data beside the checkout (the pair banks
# are rebuilt from it, deterministically, when runs/banks/ lacks them).
set -euo pipefail
cd "$(dirname "$0")/.."
for name in deepr-he-20x deepr-he-20x-ft deepr-he-20x-kohler deepr-fluo-40x deepr-fluo-40x-tr; do
  if [ ! -f "runs/${name}/checkpoint.pt" ] && [ -f "pipelines/checkpoints/${name}.pt" ]; then
    mkdir -p "runs/${name}"
    cp "pipelines/checkpoints/${name}.pt" "runs/${name}/checkpoint.pt"
  fi
done
wsi-deepr train pipelines/configs/he-20x.toml
wsi-deepr train pipelines/configs/he-20x-finetune.toml
wsi-deepr train pipelines/configs/he-20x-kohler.toml
wsi-deepr train pipelines/configs/fluo-40x.toml
wsi-deepr train pipelines/configs/fluo-40x-transfer.toml
# deepr-he-20x ships the generator trained on Köhler (partially coherent) brightfield pairs
# (he-20x-kohler.toml, from deepr-he-20x-ft). Against the incoherent-trained deepr-he-20x-ft
# (kept in pipelines/range-models/ as deepr-he-20x-incoherent, train_range_models.sh) it is
# ahead on the held-out fields at every |z| >= 3 um and at z = 0, and has the lower RMSE in
# every band of the demo's tilt.
wsi-deepr export runs/deepr-he-20x-kohler/checkpoint.pt models/deepr-he-20x.onnx --name deepr-he-20x --overwrite
# deepr-fluo-40x ships the fluorescence generator started from the Köhler H&E one
# (fluo-40x-transfer.toml; the from-scratch fluo-40x run learned nothing).
wsi-deepr export runs/deepr-fluo-40x-tr/checkpoint.pt models/deepr-fluo-40x.onnx --name deepr-fluo-40x --overwrite
# The int8 variants: calibrated on train-split tiles, each checked against its full model
# on the whole held-out set (card: variant, validation.vs_full). `wsi-deepr run` takes one by
# default on the CPU only where that check is within 0.01 SSIM at every defocus
# (model_registry.int8_fits_default): deepr-he-20x-int8 is, deepr-fluo-40x-int8 is not.
wsi-deepr quantize deepr-he-20x models/deepr-he-20x-int8.onnx --method Percentile --tiles 128 --full-check --overwrite
wsi-deepr quantize deepr-fluo-40x models/deepr-fluo-40x-int8.onnx --method Percentile --full-check --overwrite
