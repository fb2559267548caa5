#!/usr/bin/env bash
# Many nodes with c10d rendezvous: run this same command on every node (same arguments).
#   MASTER_ADDR=node001 NNODES=4 launch/torchrun-multi-node.sh experiment=mpt-30b \
#       data.path=/shared/c4-neox run_dir=/shared/runs/mpt-30b
# MASTER_ADDR is any one of the nodes, reachable from all others on MASTER_PORT. run_dir and the
# data folder must be on a filesystem every node sees (checkpoints are written by all ranks).
# Nodes may start in any order; the job begins when all NNODES have joined.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
: "${MASTER_ADDR:?set MASTER_ADDR to the host name of one of the nodes}"
: "${NNODES:?set NNODES to the number of nodes}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
RDZV_ID="${RDZV_ID:-mptlike-$MASTER_ADDR-$MASTER_PORT}"
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc_per_node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    -m mptlike.train "$@"
