#!/usr/bin/env bash
# GPU check of issue 8, item 3: CUDA and TensorRT, fp16 and fp32, rows (a), (b), (e) of
# pipelines/bench_compare.py on an 8192 px slide. Written for a session that is lent an
# H100/H200 through the device tool (one prepared script, results under $OUT); never run
# on a GPU yet: no GPU has been lent to this project's sessions so far.
#
#   bash pipelines/gpu_check.sh run            # on the GPU machine: the check itself
#   bash pipelines/gpu_check.sh prepare        # here, with network: wheels into .whl/
#   bash pipelines/gpu_check.sh stage DIR      # on the GPU machine: keep one carried part
#
# run: prints `nvidia-smi -L`, the ONNX Runtime build and which GPU providers really load
# (wsi_deepr.inference.provider_loads), then for --device cuda and tensorrt (where it
# loads) and --precision fp16 and fp32 runs
#     bench_compare.py --sizes 8192 --only abe --model models/deepr-he-20x.onnx
# and writes every figure line (s/mm2, tiles/s, provider, precision, GPU name) to
# $OUT/gpu_check.txt (/tmp/wsi-deepr-gpu-check-out/ without $OUT) and each run's rows to
# $OUT/compare_<device>_<precision>.json. Estimated (never run) 4-6 minutes on one H100, CUDA only;
# TensorRT adds its engine builds (cached in $WSI_DEEPR_TRT_CACHE, a fresh machine has none).
# Without a GPU it stops at once, exit 3, with one line saying so; exit 4 where neither
# CUDA nor TensorRT loads in ONNX Runtime, exit 5 where the staged parts are incomplete.
#
# What the lent machine lacks (device README, KINDS.md, 2026-11): its python3 (3.12) has
# torch with the CUDA 13 libraries (cuBLAS, cuRAND, cuFFT, cuDNN 9 as nvidia-* wheels) and
# onnxruntime 1.30 *CPU*; no onnxruntime-gpu, no TensorRT (libnvinfer), no dask/zarr/
# imagecodecs/openslide, and it cannot reach PyPI. onnxruntime-gpu 1.31.1 (cp312) is a
# 256 MB wheel built for CUDA 13, which the torch libraries satisfy once on
# LD_LIBRARY_PATH (done below). A call carries at most 64 MiB *including the working
# tree*, so `prepare` cuts the wheels (285 MB with the others, all resolved for cp312 on
# 2026-11-26) into parts that fit beside the tree; each part travels in its own call
# (`stage`; issue them back to back, the machine goes back after 30 s idle), then `run`
# puts them together (the tar pieces were checked here to reassemble to the same wheels).
# With the tree as committed (47 MiB, 41 MB of it pipelines/checkpoints/*.pt) that is
# 20 parts of 14 MiB: too many calls for a 15-minute lease. Deleting the tracked
# checkpoints and sample slide from the working tree before `prepare` (restore them after
# with `git checkout -- pipelines/checkpoints wsi_deepr/samples`) leaves about 6 parts of
# 56 MiB; whether the device tool accepts a tree with deleted tracked files is untested.
# TensorRT's wheels (over 1 GB) cannot travel at all: on that image the TensorRT rows
# report "does not load" and only CUDA is measured.
#
# The device calls, in order (k = 01 .. NN as `prepare` lists them):
#   run(command="bash pipelines/gpu_check.sh stage .whl/part-k",
#       carry=[".whl/part-k"], timeout_s=120)
#   run(command="bash pipelines/gpu_check.sh run", timeout_s=540)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGE_DIR="${WSI_DEEPR_STAGE:-/tmp/wsi-deepr-stage}"
SITE_DIR="${WSI_DEEPR_SITE:-/tmp/wsi-deepr-site}"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-/tmp/wsi-deepr-gpu-check-out}"
REPORT="$OUT_DIR/gpu_check.txt"
SIZE_PX="${GPU_CHECK_SIZE_PX:-8192}"
PER_RUN_S="${GPU_CHECK_PER_RUN_S:-150}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"  # no new configuration starts after this
# Pinned to what this project's CPU environment runs (same versions, cp312 builds).
read -r -a WHEELS <<<"${GPU_CHECK_WHEELS:-}"  # a test's own list, else:
(( ${#WHEELS[@]} )) || WHEELS=(
  onnxruntime-gpu==1.31.1 dask==2026.8.0 distributed==2026.8.0 zarr==3.1.6
  numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 imagecodecs==2026.3.6
  openslide-python==1.4.7 openslide-bin==4.0.1.2 tblib==3.2.2 zict==3.0.0 locket==1.0.0
  partd==1.4.2 tornado==6.6.1 importlib-metadata==10.2.0 lazy-importer==0.1.0
)

say() { echo "$*" | tee -a "$REPORT"; }

prepare() {
  # Here (x86-64 or not), with network: the cp312 manylinux wheels, then parts that fit.
  # .whl/ is in .gitignore: what is there travels only when a call carries it
  cd "$REPO"
  rm -rf .whl/all .whl/bundle.tar .whl/part-* && mkdir -p .whl/all
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl/all "${WHEELS[@]}"
  # what travels anyway: tracked files and untracked ones git does not ignore
  local tree_b part_b
  tree_b=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
  part_b=${GPU_CHECK_PART_BYTES:-$(( 64 * 1024 * 1024 - tree_b - 2 * 1024 * 1024 ))}
  if [[ -z "${GPU_CHECK_PART_BYTES:-}" ]] && (( part_b < 4 * 1024 * 1024 )); then
    echo "gpu_check: the working tree ($tree_b bytes) leaves no room beside it" >&2; exit 2
  fi
  (cd .whl/all && tar -cf ../bundle.tar ./*.whl)
  (cd .whl && split -b "$part_b" -d -a 2 bundle.tar bundle.tar.)
  local sum parts
  sum=$(sha256sum .whl/bundle.tar | cut -d' ' -f1)
  parts=$(ls .whl/bundle.tar.* | wc -l)
  local n=0
  for piece in .whl/bundle.tar.*; do
    n=$((n + 1))
    local dir; dir=$(printf '.whl/part-%02d' "$n")
    mkdir -p "$dir" && mv "$piece" "$dir/"
  done
  echo "parts=$parts sha256=$sum" >.whl/part-01/bundle.manifest
  rm -rf .whl/all .whl/bundle.tar
  echo "gpu_check: $n parts of at most $((part_b / 1024 / 1024)) MiB beside a $((tree_b / 1024 / 1024)) MiB tree:"
  ls -d .whl/part-*
}

stage() {
  # On the GPU machine: keep one carried part outside the tree, for `run`.
  local dir="${1:?stage needs the carried part folder, e.g. .whl/part-01}"
  mkdir -p "$STAGE_DIR" && cp "$REPO/$dir"/bundle.* "$STAGE_DIR/"
  echo "gpu_check: staged $(ls "$STAGE_DIR"/bundle.tar.* | wc -l) part(s) in $STAGE_DIR"
}

install_staged() {
  if compgen -G "$STAGE_DIR/bundle.tar.*" >/dev/null; then
    # all parts, in one piece, or nothing (a machine given back between calls loses them)
    local want have sum
    want=$(sed -n 's/.*sha256=\([0-9a-f]*\).*/\1/p' "$STAGE_DIR/bundle.manifest" 2>/dev/null || true)
    have=$(ls "$STAGE_DIR"/bundle.tar.* | wc -l)
    sum=$(cat "$STAGE_DIR"/bundle.tar.* | sha256sum | cut -d' ' -f1)
    if [[ -z "$want" || "$sum" != "$want" ]]; then
      say "gpu_check: the $have staged part(s) in $STAGE_DIR do not make the prepared bundle"
      say "  ($(cat "$STAGE_DIR/bundle.manifest" 2>/dev/null || echo 'no manifest: part-01 not staged')); stage every part again"
      exit 5
    fi
    say "gpu_check: $have staged parts, bundle sha256 ${sum:0:16}... as prepared"
    mkdir -p "$SITE_DIR/wheels"
    cat "$STAGE_DIR"/bundle.tar.* | tar -xf - -C "$SITE_DIR/wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE_DIR" "$SITE_DIR"/wheels/*.whl
    export PYTHONPATH="$SITE_DIR:${PYTHONPATH:-}"
  fi
  export PYTHONPATH="$REPO:${PYTHONPATH:-}"
  # onnxruntime-gpu finds CUDA 13, cuBLAS, cuRAND, cuFFT and cuDNN in the nvidia-* wheels
  local libs
  libs=$("$PY" - <<'EOF'
import glob, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
dirs = {d for r in roots for p in ("nvidia/*/lib", "nvidia/*/*/lib", "tensorrt_libs")
        for d in glob.glob(f"{r}/{p}")}
print(":".join(sorted(dirs)))
EOF
)
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

run_check() {
  mkdir -p "$OUT_DIR" && : >"$REPORT"
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    say "gpu_check: no NVIDIA GPU here (nvidia-smi missing or it lists none); run this on a lent H100/H200"
    exit 3
  fi
  say "== $(date -u +%FT%TZ) gpu_check on $(hostname)"
  nvidia-smi -L | tee -a "$REPORT"
  install_staged
  compgen -G "$STAGE_DIR/bundle.tar.*" >/dev/null \
    || say "gpu_check: nothing staged in $STAGE_DIR; using the onnxruntime python3 has"
  cd "$REPO"
  local loads
  loads=$("$PY" - 2>&1 <<'EOF' | tee -a "$REPORT" | tail -n 1
import onnxruntime as ort
from wsi_deepr import inference
print(f"onnxruntime {ort.__version__} ({ort.__file__}); listed: {ort.get_available_providers()}")
ok = [d for d, p in (("cuda", inference.CUDA), ("tensorrt", inference.TENSORRT))
      if inference.provider_loads(p)]
for d, p in (("cuda", inference.CUDA), ("tensorrt", inference.TENSORRT)):
    print(f"{p}: {'loads' if d in ok else 'does not load'}")
print(" ".join(ok))
EOF
) || true
  if [[ -z "$loads" || "$loads" == *Error* || "$loads" == *rror:* ]]; then
    say "gpu_check: neither CUDA nor TensorRT loads in ONNX Runtime here (see above);"
    say "  carry onnxruntime-gpu (prepare + stage) or check the CUDA 13 / cuDNN 9 libraries"
    exit 4
  fi
  export WSI_DEEPR_TRT_CACHE="${WSI_DEEPR_TRT_CACHE:-/tmp/wsi-deepr-trt}"
  local workdir=/tmp/wsi-deepr-gpu-check
  mkdir -p "$workdir"
  for device in cuda tensorrt; do
    if [[ " $loads " != *" $device "* ]]; then
      say "-- --device $device: skipped, $device does not load here"
      continue
    fi
    for precision in fp16 fp32; do
      if (( SECONDS > BUDGET_S )); then
        say "-- --device $device --precision $precision: skipped, past ${BUDGET_S} s"
        continue
      fi
      say "-- --device $device --precision $precision (${SIZE_PX} px, rows a b e)"
      local started=$SECONDS
      PYTHONUNBUFFERED=1 timeout "$PER_RUN_S" "$PY" pipelines/bench_compare.py --sizes "$SIZE_PX" --only abe \
        --model models/deepr-he-20x.onnx --device "$device" --precision "$precision" \
        --workdir "$workdir" --json "$OUT_DIR/compare_${device}_${precision}.json" \
        2>&1 | grep -v '^rows: ' | tee -a "$REPORT" \
        || say "   (failed or over ${PER_RUN_S} s: exit ${PIPESTATUS[0]})"
      say "   ($((SECONDS - started)) s with the slide, sessions and engine builds)"
    done
  done
  say "== done; figures in $REPORT"
}

case "${1:-run}" in
  prepare) prepare ;;
  stage) stage "${2:-}" ;;
  run) run_check ;;
  *) echo "usage: $0 [run | prepare | stage DIR]" >&2; exit 2 ;;
esac
