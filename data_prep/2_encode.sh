#!/bin/bash
# Stage 2: raw shards -> training shards (VAE latents + umT5 embeddings) on the GPUs of one node:
# one rank per GPU, input shard i on rank i mod world. Re-running resumes (finished shards skipped).
# On a Slurm cluster use the array job instead: sbatch --array=0-31 slurm/data_encode.sbatch data_prep/openvid.yaml
set -euo pipefail
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NGPU=$(( NGPU > 0 ? NGPU : 1 ))
pids=()
for ((r = 0; r < NGPU; r++)); do
  RANK=$r WORLD_SIZE=$NGPU LOCAL_RANK=$r vmla-data encode data_prep/openvid.yaml "$@" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done  # fail if any rank failed
