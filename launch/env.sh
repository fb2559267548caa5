# Environment for multi-GPU / multi-node runs; `source launch/env.sh` before torchrun, or let the
# launch scripts do it. Every variable keeps a value you exported yourself.

# One OpenMP/MKL thread per rank: torchrun starts one process per GPU, and CPU work in each
# (data loading, optimizer on CPU tensors) should not oversubscribe the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# NCCL: fail fast with a readable error instead of hanging when a rank dies, and say why.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"            # INFO prints the chosen transports/topology
# Set these only when your cluster needs them (ask your admins which interface is the fabric):
# export NCCL_SOCKET_IFNAME=ib0                   # or eth0, bond0 ...: the interface for bootstrap
# export NCCL_IB_HCA=mlx5                          # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1                         # clusters without InfiniBand
# export NCCL_P2P_DISABLE=1                        # GPUs without NVLink/PCIe P2P (rare; slower)

# Allocator: fewer fragmentation OOMs for long runs with varying activation sizes.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# Compute nodes rarely have internet: W&B logs offline under run_dir/wandb (the default,
# logger.mode=offline); sync later from a login node with `wandb sync RUN_DIR/wandb/offline-run-*`.
# Tokenizers must not fork thread pools into data-loader workers.
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
# How long torchrun lets its workers finish after it forwards SIGTERM/SIGINT before it kills them:
# the step in flight plus the preemption checkpoint must fit (torch releases with
# `torchrun --shutdown-timeout` read it; older ones wait a fixed 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-270}"
