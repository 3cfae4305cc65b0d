#!/usr/bin/env bash
# Train (or resume) the shipped generators and export them with their model cards into
# models/. Each `wsi-deepr train` resumes from runs/<name>/checkpoint.pt when it exists,
# so this can be run again in a later session to continue training.
# Needs: pip install -e '.[train]' and ../shared/data beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
for config in he-20x fluo-40x; do
  wsi-deepr train "pipelines/configs/${config}.toml"
done
wsi-deepr export runs/deepr-he-20x/checkpoint.pt models/deepr-he-20x.onnx --overwrite
wsi-deepr export runs/deepr-fluo-40x/checkpoint.pt models/deepr-fluo-40x.onnx --overwrite
