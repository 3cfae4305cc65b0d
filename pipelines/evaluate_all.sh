#!/usr/bin/env bash
# Reproduce the whole evaluation report (issue 4) from a clean checkout:
#
#   pipelines/evaluate_all.sh [OUT_DIR] [extra wsi-deepr evaluate options...]
#
# Evaluates every shipped model in models/ (each <name>.onnx with its <name>.json card) and,
# for the training-range trade-off (Fig. 8), any extra generators exported to
# pipelines/range-models/*.onnx. Held-out images and bead stacks come from ../shared/data
# (override with WSI_DEEPR_DATA). Writes OUT_DIR/index.html (default reports/evaluation)
# with every number also as CSV/JSON. About 15 minutes for two models on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-reports/evaluation}"
shift || true
data="${WSI_DEEPR_DATA:-../shared/data}"

models=()
for card in models/*.json; do
    [ -e "$card" ] || continue
    if [ -e "${card%.json}.onnx" ]; then
        models+=(--model "${card%.json}.onnx")
    fi
done
for extra in pipelines/range-models/*.onnx; do
    if [ -e "$extra" ]; then
        models+=(--model "$extra")
    fi
done
if [ "${#models[@]}" -eq 0 ]; then
    echo "evaluate_all: no models in models/ or pipelines/range-models/" >&2
    exit 2
fi

exec python -m wsi_deepr evaluate "${models[@]}" --out "$out" --data-dir "$data" --overwrite "$@"
