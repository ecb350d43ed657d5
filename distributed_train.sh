#!/usr/bin/env bash
# Train with NUM_PROC processes per node through torchrun: one per GPU, or CPU processes (gloo).
#   ./distributed_train.sh NUM_PROC [train.py options...]
# One node: torchrun --standalone finds a free port, so several jobs can share a machine; MASTER_PORT=N
# fixes the port instead.
# Several nodes: run it on every node with the same NNODES, MASTER_ADDR and MASTER_PORT and each
# node's own NODE_RANK (0 .. NNODES-1); MASTER_ADDR is the address of the NODE_RANK 0 machine.
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 NUM_PROC [train.py options...]   (NUM_PROC: processes per node, e.g. 8 for 8 GPUs)" >&2
    exit 2
fi
NUM_PROC=$1
shift
if [ "${NNODES:-1}" = 1 ] && [ -z "${MASTER_PORT:-}" ]; then
    RENDEZVOUS=(--standalone)
else
    RENDEZVOUS=(--nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}"
                --master_port="${MASTER_PORT:-29500}")
fi
exec "${PYTHON:-python3}" -m torch.distributed.run "${RENDEZVOUS[@]}" --nproc_per_node="$NUM_PROC" \
    "$(dirname "$0")/train.py" "$@"
