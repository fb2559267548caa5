#!/usr/bin/env bash
# One node, all its GPUs (or NPROC processes):
#   launch/torchrun-single-node.sh experiment=mpt-7b data.path=/data/c4-neox run_dir=runs/mpt-7b
#   NPROC=2 launch/torchrun-single-node.sh trainer=cpu     # 2 CPU processes with gloo (testing)
#   MAX_RESTARTS=3 launch/torchrun-single-node.sh ...       # restart all workers after a crash (resume=auto)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
NPROC="${NPROC:-1}"
[ "$NPROC" -ge 1 ] || NPROC=1
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    -m mptlike.train "$@"
