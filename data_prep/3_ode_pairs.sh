#!/bin/bash
# Stage 3: prompts (captions of the training shards, or prep.ode.prompts_file=...) -> teacher ODE
# trajectories (flow-matching Euler, CFG with Wan's negative prompt) for ODE-init training.
# One rank per GPU; shard j on rank j mod world; re-running resumes.
set -euo pipefail
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NGPU=$(( NGPU > 0 ? NGPU : 1 ))
pids=()
for ((r = 0; r < NGPU; r++)); do
  RANK=$r WORLD_SIZE=$NGPU LOCAL_RANK=$r vmla-data ode-pairs data_prep/openvid.yaml "$@" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done  # fail if any rank failed
