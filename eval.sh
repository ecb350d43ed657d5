#!/usr/bin/env bash
# Evaluate a checkpoint on a validation folder with validate.py; EMA weights when the checkpoint has them.
#   bash eval.sh VAL_DIR CHECKPOINT [validate.py options...]
# NUM_PROC=N runs N processes through torchrun (the numbers equal those of one process).
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 VAL_DIR CHECKPOINT [validate.py options...]" >&2
    exit 2
fi
VAL_DIR=$1
CHECKPOINT=$2
shift 2
VALIDATE="$(dirname "$0")/validate.py"
if ! [[ "${NUM_PROC:-1}" =~ ^[1-9][0-9]*$ ]]; then
    echo "$0: NUM_PROC=${NUM_PROC} is not a number of processes; give a whole number from 1, e.g. NUM_PROC=8" >&2
    exit 2
fi
if [ "${NUM_PROC:-1}" -gt 1 ]; then
    exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node="$NUM_PROC" \
        "$VALIDATE" "$VAL_DIR" --checkpoint "$CHECKPOINT" "$@"
fi
exec "${PYTHON:-python3}" "$VALIDATE" "$VAL_DIR" --checkpoint "$CHECKPOINT" "$@"
