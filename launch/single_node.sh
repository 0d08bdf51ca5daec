#!/usr/bin/env bash
# One node, one process per GPU (or 2 gloo processes on a machine without GPUs):
#
#   launch/single_node.sh [section.key=value ...]
#   NPROC=4 CONFIG=configs/digits.yaml launch/single_node.sh train.epochs=2
#
# Environment (all optional):
#   NPROC      processes on this node; default: the number of visible GPUs (CUDA_VISIBLE_DEVICES is
#              respected), or 2 when there is none (CPU, gloo backend).
#   CONFIG     config file; default configs/hrnas_imagenet.yaml.
#   TORCHRUN   the torchrun to use; default `torchrun` on PATH, else the repo's .venv/bin/torchrun.
#   PYTHON     the Python used to count GPUs; default: the one next to TORCHRUN.
#   OMP_NUM_THREADS  CPU threads per process; torchrun sets 1 when unset (and says so).
#   NCCL_* / TORCH_NCCL_*  passed through to every rank (see docs/launching.md).
# Everything after the script name is passed to dist_hrnas.train as config overrides.
# The script runs from the repository root, so relative paths (CONFIG, data.root, log.run_dir, runs/)
# are resolved there.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${TORCHRUN:-}" ]]; then
    if command -v torchrun >/dev/null 2>&1; then
        TORCHRUN=torchrun
    elif [[ -x .venv/bin/torchrun ]]; then
        TORCHRUN=.venv/bin/torchrun
    else
        echo "error: torchrun not found; install PyTorch (make venv) or set TORCHRUN" >&2
        exit 2
    fi
fi

if [[ -z "${NPROC:-}" ]]; then
    if [[ -z "${PYTHON:-}" ]]; then
        # The python that torchrun itself runs with, so it sees the same torch.
        TORCHRUN_PATH=$(command -v "$TORCHRUN" || true)
        PYTHON="$(dirname "$TORCHRUN_PATH")/python"
        [[ -x "$PYTHON" ]] || PYTHON=python3
    fi
    GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    if [[ "$GPUS" =~ ^[0-9]+$ ]] && (( GPUS > 0 )); then
        NPROC=$GPUS
    else
        NPROC=2
    fi
fi

exec "$TORCHRUN" --standalone --nproc_per_node "$NPROC" \
    -m dist_hrnas.train --config "${CONFIG:-configs/hrnas_imagenet.yaml}" "$@"
