#!/bin/bash
# Pre-training with torchrun: GPUS_PER_NODE processes on this node, NODES nodes in all.
#
#   one node, 8 GPUs:  GPUS_PER_NODE=8 CONFIG=experiments/mpcl/r50_in1k_mocov2.yaml bash experiments/launch/torchrun.sh
#   two nodes:         run on each node, with the same MASTER_ADDR (node 0) and SSL_ZOO_RUN_STAMP:
#     NODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0> SSL_ZOO_RUN_STAMP=run1 GPUS_PER_NODE=8 CONFIG=... bash experiments/launch/torchrun.sh
#
# ARGS="..." adds command-line overrides; DRY_RUN=1 prints the command instead of running it. With --resume
# auto, launching again with the same SSL_ZOO_RUN_STAMP continues that run from its checkpoints/last.ckpt.
set -euo pipefail

: "${CONFIG:?set CONFIG=experiments/<method>/<config>.yaml}"
NODES="${NODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
ARGS="${ARGS:-}"
PYTHON="${PYTHON:-.venv/bin/python}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

# Every process (and every node, when they share the stamp) writes to the same runs/<name>/<stamp>/.
export SSL_ZOO_RUN_STAMP="${SSL_ZOO_RUN_STAMP:-$(date +%Y%m%d-%H%M%S)}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NODES" --node_rank "$NODE_RANK"
     --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     -m ssl_zoo fit --config "$CONFIG"
     --trainer.accelerator gpu --trainer.strategy ddp
     --trainer.num_nodes "$NODES" --trainer.devices "$GPUS_PER_NODE" --resume auto)
eval "extra=($ARGS)"  # ARGS holds command-line overrides, shell-quoted as on a command line
cmd+=("${extra[@]}")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "SSL_ZOO_RUN_STAMP=$SSL_ZOO_RUN_STAMP NCCL_DEBUG=$NCCL_DEBUG"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
