#!/bin/bash
# Submit slurm/train.sbatch on NODES x GPUS_PER_NODE GPUs (one task per GPU).
#
#   slurm/submit_train.sh NODES GPUS_PER_NODE CONFIG [key=value ...]
#   e.g. JOB_NAME=sf-14b slurm/submit_train.sh 8 8 configs/self_forcing.yaml train.teacher_size=wan-14b ...
#   CPU nodes: GPUS_PER_NODE=0 runs CPU_TASKS_PER_NODE (default 1) gloo ranks per node with
#   CPUS_PER_TASK (default 1) cores each, e.g. slurm/submit_train.sh 2 0 configs/self_forcing-debug.yaml \
#       strategy.name=ddp train.global_batch_size=2
#
# The job name (JOB_NAME, default: the config's file name) names the run folder runs/<job name>:
# resubmitting with the same name resumes that run.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,11p' "$0"; exit 2
fi
NODES="$1"; GPUS="$2"; CONFIG="$3"; shift 3
NAME="${JOB_NAME:-$(basename "$CONFIG" .yaml)}"
if [ "$GPUS" = 0 ]; then
    TASKS="${CPU_TASKS_PER_NODE:-1}"
    export VMLA_ACCELERATOR=cpu
    CPU_ARGS=(--cpus-per-task="${CPUS_PER_TASK:-1}")
else
    TASKS="$GPUS"
    CPU_ARGS=()
fi
mkdir -p logs
set -x
sbatch --job-name="$NAME" --nodes="$NODES" --gpus-per-node="$GPUS" --ntasks-per-node="$TASKS" "${CPU_ARGS[@]}" \
    "$(dirname "$0")/train.sbatch" "$CONFIG" "$@"
