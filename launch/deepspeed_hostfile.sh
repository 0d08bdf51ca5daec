#!/usr/bin/env bash
# The DeepSpeed launcher (`deepspeed`, ZeRO engine). Run on the first node of the hostfile; the launcher
# ssh-es (pdsh) into every host listed there and starts one process per GPU on each:
#
#   cp launch/hostfile.example launch/hostfile   # edit: one "<host> slots=<GPUs>" line per node
#   ZERO_STAGE=2 launch/deepspeed_hostfile.sh [section.key=value ...]
#
# Without a hostfile the launcher uses the local node's GPUs only.
#
# Environment (all optional):
#   HOSTFILE       hostfile path; default launch/hostfile (see launch/hostfile.example).
#   GPUS_PER_NODE  GPUs used on each node (the first N); default: every slot of each host.
#   NUM_NODES      use only the first N hosts of the hostfile; default: all of them.
#   ZERO_STAGE     DeepSpeed ZeRO stage 0, 1 or 2 (dist.deepspeed.zero_stage); default 1.
#   MASTER_ADDR    address the other nodes reach the first host at; default: the launcher asks the first
#                  host for `hostname -I` (set it when that picks the wrong interface).
#   MASTER_PORT    rendezvous port on MASTER_ADDR; default 29500.
#   CONFIG         config file; default configs/hrnas_imagenet.yaml.
#   DEEPSPEED      the launcher to run; default `deepspeed` on PATH, else the repo's .venv/bin/deepspeed.
# The launcher sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process, as
# torchrun does. It forwards only NCCL_*, PYTHON*, UCX_*, MV2_* and MLFLOW* variables to the other nodes;
# put anything else (OMP_NUM_THREADS, TORCH_NCCL_ASYNC_ERROR_HANDLING, ...) in a `.deepspeed_env` file
# (KEY=VALUE lines) in the repository root or your home directory.
# Requirements for several nodes: passwordless ssh from this node to every host, pdsh installed, and this
# repository at the same path on every node (the launcher cds there and puts it on PYTHONPATH).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

source launch/common.sh
find_tool DEEPSPEED deepspeed

HOSTFILE=${HOSTFILE:-launch/hostfile}
if [[ ! -f "$HOSTFILE" ]]; then
    echo "note: no hostfile at $HOSTFILE: running on this node only (see launch/hostfile.example)" >&2
fi

# --no_local_rank: we read LOCAL_RANK from the environment; dist_hrnas.train takes no --local_rank flag.
# --module: run `python -m dist_hrnas.train` in every process.
args=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module)
if [[ -n "${GPUS_PER_NODE:-}" ]]; then
    args+=(--num_gpus "$GPUS_PER_NODE")
fi
if [[ -n "${NUM_NODES:-}" ]]; then
    args+=(--num_nodes "$NUM_NODES")
fi
if [[ -n "${MASTER_ADDR:-}" ]]; then
    args+=(--master_addr "$MASTER_ADDR")
fi

exec "$DEEPSPEED" "${args[@]}" \
    dist_hrnas.train --config "${CONFIG:-configs/hrnas_imagenet.yaml}" \
    dist.engine=deepspeed "dist.deepspeed.zero_stage=${ZERO_STAGE:-1}" "$@"
