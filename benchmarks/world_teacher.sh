#!/usr/bin/env bash
# Build the world's frozen models and its teacher from nothing, with the project's own commands:
#
#   [codec (benchmarks/world_codec.py)] -> vmla-world models (codec + text encoder) -> vmla-data world (clips)
#   -> vmla-data raw -> vmla-data encode -> vmla-data negative-embedding
#   -> vmla-train fit configs/world/world-pretrain.yaml -> export -> vmla-convert --to diffusers (the teacher, bf16)
#   -> vmla-world sample-teacher on held-out prompts (adherence, Fréchet distance against the held-out floor)
#
#   bash benchmarks/world_teacher.sh [STAGE ...]     stages: codec models clips data fit teacher eval
#                                                    (default: all but codec: the shipped codec, checkpoints/world/models)
#
# Every stage resumes: run the same command again after an interruption (or after FIT_SECONDS stopped the
# fit) and finished work is kept. Settings (environment, defaults in brackets): WORLD_DIR [runs/world],
# CLIPS [20000], SPLIT [0] (the world stream the clips come from: continue a teacher on fresh scenes with another
# split; the held-out prompts stay those of stream 1000), WORKERS [cores - 2],
# CODEC [checkpoints/world/models/vae; $W/codec/vae once the codec stage ran] (the codec the models folder takes), CODEC_IMAGE_BUDGET seconds [360] (the codec on single frames),
# TEXT [checkpoints/world/text: the world text encoder pretrained on its captions; "seeded": the random one
# the teachers before it trained with] (the text encoder the models folder takes),
# CODEC_BUDGET seconds [380] (then on clips), CODEC_FRAMES [49], CODEC_ARGS (extra world_codec.py flags for
# both phases, e.g. --dim-mult 1 2 4 for 4x in space: every later stage takes video.vae_stride from the codec's
# config),
# FIT_SECONDS (stop the fit with SIGUSR1 after that many seconds: it checkpoints and exits; empty = run to
# train.num_steps), FIT_ARGS (extra key=value for the fit), FIT_FROM (a diffusers teacher folder whose weights
# start a fresh fit: continues a teacher trained elsewhere, optimizer restarted), EVAL_PROMPTS [64], EVAL_STEPS [48], DEVICE [cuda],
# ENCODE_PROCS [1] (encode processes sharing the device).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORLD_DIR:-runs/world}
CLIPS=${CLIPS:-20000}
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
DEVICE=${DEVICE:-cuda}
STAGES=${*:-models clips data fit teacher eval}
has() { [[ " $STAGES " == *" $1 "* ]]; }
say() { echo "[$(date -u +%H:%M:%S)] world_teacher: $*"; }
source benchmarks/world_common.sh
PREP=("prep.raw.csv=[$W/clips/world.csv]" "prep.raw.videos=[$W/clips/videos]" "prep.raw.output=$W/raw"
      "prep.raw.num_workers=$WORKERS" "prep.encode.input=$W/raw/raw-*.tar" "prep.encode.output=$W/train"
      "prep.encode.vae=$W/models" "prep.encode.text_encoder=$W/models" "runtime.device=$DEVICE")

if has codec; then
  say "codec"
  # two phases (benchmarks/README.md, "World codec"): single frames (fast steps, the spatial code), then that
  # codec inflated to a frame-by-frame clip codec and trained on clips longer than its temporal receptive
  # field (trained on 9 frames a codec fails past frame ~12)
  python benchmarks/world_codec.py --out "$W/codec-image" --frames 1 --batch 64 --steps 100000 --lr 3e-4 \
    --budget "${CODEC_IMAGE_BUDGET:-360}" --one-pass --ceiling-clips 0 --workers "$WORKERS" --device "$DEVICE" \
    ${CODEC_ARGS:-}
  python benchmarks/world_codec.py --out "$W/codec" --frames "${CODEC_FRAMES:-49}" --batch 32 --steps 100000 \
    --lr 2e-4 --budget "${CODEC_BUDGET:-380}" --one-pass --init-from "$W/codec-image" --inflate --workers "$WORKERS" \
    --device "$DEVICE" ${CODEC_ARGS:-}
fi
if has models; then
  [[ -z "${CODEC:-}" && -d "$W/codec/vae" ]] && CODEC=$W/codec/vae
  TEXT=${TEXT:-checkpoints/world/text}
  say "models: codec ${CODEC:=checkpoints/world/models/vae} + the world's text encoder ($TEXT)"
  [[ "$TEXT" == seeded ]] && TEXT_FLAG=() || TEXT_FLAG=(--text-encoder "$TEXT")
  [[ -d "$W/models" ]] || vmla-world models "$W/models" --vae "$CODEC" "${TEXT_FLAG[@]}"
fi
if has clips; then
  say "clips"
  # SPLIT: the stream of training scenes (another split = fresh scenes); the held-out stream stays 1000
  vmla-data world "$W/clips" num_clips="$CLIPS" split="${SPLIT:-0}" heldout_split=1000 workers="$WORKERS" progress=false
fi
if has data; then
  say "raw -> encode -> negative embedding"
  PREP+=("$(stride)")
  vmla-data raw data_prep/world.yaml "${PREP[@]}"
  # ENCODE_PROCS encode processes share the GPU (ranks of the shard list: the codec's chunked causal loop
  # leaves it mostly idle at one); a last single pass skips every shard and rebuilds the index once
  N=${ENCODE_PROCS:-1}
  if (( N > 1 )); then
    for ((r = 0; r < N; r++)); do RANK=$r WORLD_SIZE=$N vmla-data encode data_prep/world.yaml "${PREP[@]}" & done
    wait
  fi
  vmla-data encode data_prep/world.yaml "${PREP[@]}"
  vmla-data negative-embedding "$W/negative.safetensors" data_prep/world.yaml "${PREP[@]}"
fi
if has fit; then
  say "fit (pretrain)"
  FIT=(configs/world/world-pretrain.yaml "runtime.run_dir=$W/pretrain" "data.shards=$W/train/raw-*.tar"
       "dmd.negative_embedding=$W/negative.safetensors" "runtime.device=$DEVICE" "$(stride)" ${FIT_ARGS:-})
  if [[ -n "${FIT_FROM:-}" ]]; then
    # continue an earlier machine's teacher (its diffusers folder, e.g. the bf16 one the teacher stage writes):
    # its weights start the run (optimizer and EMA start afresh); the run's own checkpoints still win on resume.
    # Converted on every call (seconds; --overwrite replaces only this conversion's earlier output): never stale
    vmla-convert "$FIT_FROM" "$W/fit-from" --config configs/world/world-pretrain.yaml --overwrite
    FIT+=("train.student_path=$W/fit-from" "train.ema_start_step=0")
  fi
  if [[ -n "${FIT_SECONDS:-}" ]]; then
    # SIGUSR1 = Slurm's pre-emption notice: the fit checkpoints at the next step and exits 0
    timeout --signal=USR1 --kill-after=120 "$FIT_SECONDS" vmla-train fit "${FIT[@]}" || [[ $? == 124 ]]
  else
    vmla-train fit "${FIT[@]}"
  fi
fi
if has teacher; then
  say "export -> diffusers teacher"
  # the EMA weights (world-pretrain.yaml's train.ema_decay) once the run has them, else the raw ones
  LAST=$(ls -d "$W"/pretrain/checkpoints/step-* | tail -n 1)
  EMA=(); [[ -f "$LAST/ema.safetensors" ]] && EMA=(--ema)
  say "teacher from $LAST ${EMA[*]:-(raw weights: no EMA yet)}"
  vmla-train export "$W/pretrain" "$W/teacher-student" --overwrite "${EMA[@]}"
  # --overwrite replaces only an earlier output of this conversion, atomically
  vmla-convert "$W/teacher-student" "$W/teacher" --to diffusers convert.dtype=bfloat16 --overwrite
fi
if has eval; then
  say "eval: teacher samples of held-out prompts"
  N=${EVAL_PROMPTS:-64}
  head -n "$N" "$W/clips/prompts-heldout.txt" > "$W/eval-prompts.txt"
  STAMP=$(date -u +%Y%m%dT%H%M%S)
  vmla-world sample-teacher --teacher "$W/teacher" --vae "$W/models/vae" --text-encoder "$W/models" \
    --prompts "$W/eval-prompts.txt" --out "$W/eval-$STAMP" --world "$W/clips" --steps "${EVAL_STEPS:-48}" \
    --batch-size 16 --device "$DEVICE"
  ln -sfn "eval-$STAMP" "$W/eval"
fi
say "done: $STAGES"
