#!/usr/bin/env bash
# Several nodes, torchrun's c10d rendezvous. Run the same command on every node (any order; the
# rendezvous waits until NNODES agents have joined, node ranks are assigned by the rendezvous):
#
#   MASTER_ADDR=node0.cluster NNODES=4 NPROC_PER_NODE=8 launch/multi_node.sh [section.key=value ...]
#
# Environment:
#   MASTER_ADDR     (required) host name or IP of one of the nodes; torchrun on the node that recognises
#                   this address as its own hosts the rendezvous store. Must be the same on every node.
#   NNODES          (required) number of nodes. (MIN:MAX makes torchrun elastic, but a changed world size
#                   changes the global batch; keep it fixed for reproducible searches.)
#   NPROC_PER_NODE  processes per node; default: the number of visible GPUs on this node, or 2 without GPUs.
#   MASTER_PORT     rendezvous port on MASTER_ADDR, reachable from every node; default 29500.
#   JOB_ID          rendezvous id, the same on every node and unique per job; default dist_hrnas.
#   MAX_RESTARTS    times torchrun restarts the whole worker group after a failure; default 3. Safe: with
#                   checkpoint.resume=auto (the default) a restarted run resumes from
#                   <run_dir>/checkpoints/last.pt, so the run directory must be on a filesystem every node
#                   sees (log.run_dir=/shared/runs/NAME).
#   CONFIG          config file; default configs/hrnas_imagenet.yaml.
#   TORCHRUN        the torchrun to use; default `torchrun` on PATH, else the repo's .venv/bin/torchrun.
#   OMP_NUM_THREADS, NCCL_*, TORCH_NCCL_*  passed through to every rank (see docs/launching.md).
# Everything after the script name is passed to dist_hrnas.train as config overrides.
set -euo pipefail

: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
: "${NNODES:?set NNODES to the number of nodes}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

source launch/common.sh
find_tool TORCHRUN torchrun
NPROC_PER_NODE=${NPROC_PER_NODE:-$(default_nproc "$TORCHRUN")}

exec "$TORCHRUN" \
    --nnodes "$NNODES" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT:-29500}" \
    --rdzv-id "${JOB_ID:-dist_hrnas}" \
    --max-restarts "${MAX_RESTARTS:-3}" \
    -m dist_hrnas.train --config "${CONFIG:-configs/hrnas_imagenet.yaml}" "$@"
