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
#   OMP_NUM_THREADS  CPU threads per process; torchrun sets 1 when unset (and says so).
#   NCCL_* / TORCH_NCCL_*  passed through to every rank (see docs/launching.md).
# Everything after the script name is passed to dist_hrnas.train as config overrides.
# The script runs from the repository root, so relative paths (CONFIG, data.root, log.run_dir, runs/)
# are resolved there.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

source launch/common.sh
find_tool TORCHRUN torchrun
NPROC=${NPROC:-$(default_nproc "$TORCHRUN")}

exec "$TORCHRUN" --standalone --nproc_per_node "$NPROC" \
    -m dist_hrnas.train --config "${CONFIG:-configs/hrnas_imagenet.yaml}" "$@"
