#!/usr/bin/env bash
# Distributed testing on torchrun: bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCESSES [test.py args...]
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
shift 3
PORT=${PORT:-29500}
cd "$(dirname "$0")/.."
exec python -m torch.distributed.run --nnodes=1 --nproc_per_node="$NPROC" --master_port="$PORT" \
    tools/test.py "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
