#!/usr/bin/env bash
# Train (or resume) the training-range trade-off generators of the evaluation (Fig. 8,
# issue 4): deepr-he-20x fine-tuned on +/-2 and +/-5 um (configs/he-20x-range*.toml),
# exported with their cards into pipelines/range-models/, where evaluate_all.sh finds them,
# with the incoherent-trained +/-10 um generator.
# Not shipped models. Checkpoints kept in pipelines/checkpoints/ are copied to runs/ first,
# so a fresh clone continues where the last session stopped.
# Needs: pip install -e '.[train]' and ../shared/data beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in deepr-he-20x-ft deepr-he-20x-range2 deepr-he-20x-range5; do
  if [ ! -f "runs/${name}/checkpoint.pt" ] && [ -f "pipelines/checkpoints/${name}.pt" ]; then
    mkdir -p "runs/${name}"
    cp "pipelines/checkpoints/${name}.pt" "runs/${name}/checkpoint.pt"
  fi
done
for range in 2 5; do
  name="deepr-he-20x-range${range}"
  wsi-deepr train "pipelines/configs/he-20x-range${range}.toml"
  wsi-deepr export "runs/${name}/checkpoint.pt" "pipelines/range-models/${name}.onnx" --overwrite
done
# The +/-10 um generator trained on incoherent pairs (deepr-he-20x-ft, shipped before the
# Köhler-trained one): the reference the shipped deepr-he-20x is compared with.
wsi-deepr train pipelines/configs/he-20x-finetune.toml
wsi-deepr export runs/deepr-he-20x-ft/checkpoint.pt pipelines/range-models/deepr-he-20x-incoherent.onnx --name deepr-he-20x-incoherent --overwrite
