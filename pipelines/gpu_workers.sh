#!/usr/bin/env bash
# Start one Dask worker per GPU of this machine, each pinned to its GPU, for wsi-deepr.
#
#   pipelines/gpu_workers.sh tcp://scheduler:8786            # every GPU nvidia-smi lists
#   GPUS="0 2" pipelines/gpu_workers.sh tcp://scheduler:8786  # only GPUs 0 and 2
#
# Each worker is its own `dask worker` process (one thread: one model call at a time on
# its GPU) started with CUDA_VISIBLE_DEVICES set to one GPU, so ONNX Runtime's CUDA
# provider sees exactly that device as device 0. The nanny spawns the worker process
# (distributed's default 'spawn'); nothing touches CUDA before a worker's first task.
# Stops all of them on Ctrl-C / SIGTERM (e.g. from systemd).
set -euo pipefail
scheduler=${1:?usage: gpu_workers.sh SCHEDULER_ADDRESS}
gpus=${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader)}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' INT TERM
for gpu in $gpus; do
    CUDA_VISIBLE_DEVICES=$gpu dask worker "$scheduler" --nworkers 1 --nthreads 1 \
        --name "$(hostname -s)-gpu$gpu" --resources "GPU=1" &
    pids+=($!)
done
wait
