#!/bin/bash
# Submit slurm/train.sbatch on NODES x GPUS_PER_NODE GPUs (one task per GPU).
#
#   slurm/submit_train.sh NODES GPUS_PER_NODE CONFIG [key=value ...]
#   e.g. JOB_NAME=sf-14b slurm/submit_train.sh 8 8 configs/self_forcing.yaml train.teacher_size=wan-14b ...
#
# The job name (JOB_NAME, default: the config's file name) names the run folder runs/<job name>:
# resubmitting with the same name resumes that run.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,8p' "$0"; exit 2
fi
NODES="$1"; GPUS="$2"; CONFIG="$3"; shift 3
NAME="${JOB_NAME:-$(basename "$CONFIG" .yaml)}"
mkdir -p logs
set -x
sbatch --job-name="$NAME" --nodes="$NODES" --gpus-per-node="$GPUS" --ntasks-per-node="$GPUS" \
    "$(dirname "$0")/train.sbatch" "$CONFIG" "$@"
