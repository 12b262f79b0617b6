#!/usr/bin/env bash
# Distil the world teacher (benchmarks/world_teacher.sh) into the few-step block-causal MLA student, with the
# project's own commands, and score it on held-out prompts:
#
#   vmla-convert teacher -> MLA student (spectral init) -> vmla-train fit world-adapt (block-causal diffusion forcing)
#   -> vmla-data ode-pairs (teacher trajectories) -> fit world-ode_init -> fit world-self_forcing (DMD, teacher as
#   the real score, critic from the teacher) -> vmla-generate held-out prompts -> vmla-world eval
#
#   bash benchmarks/world_student.sh [STAGE ...]     stages: convert adapt ode odeinit sf eval (default: all)
#
# The causal recipe instead: ADAPT_ARGS=train.context=teacher_forcing, then stage `cd` (world-causal_cd.yaml:
# consistency distillation of the adapted student along its own ODE, exported from its EMA target) and
# SF_FROM=causal_cd; or causal ODE pairs (ODE_FROM=adapt: trajectories of the adapted causal student, kept in
# $WORLD_DIR/$TAG/ode) before odeinit.
#
# Every stage resumes: run the same command again after an interruption and finished work is kept; a fit stopped
# by its time limit continues from its checkpoint. The wall seconds of each stage add up in
# $WORLD_DIR/$TAG/stage_seconds.json (world_report.py shows them; benchmarks/world_recipes.sh compares recipes).
# Settings (environment, defaults in brackets): WORLD_DIR [runs/world], WORKERS [cores - 2], DEVICE [cuda]; TAG
# [mla]: the student variant, whose runs and exports go to $WORLD_DIR/$TAG/ (the teacher, data and ODE pairs are
# shared); STUDENT_ARGS: its key=value for the conversion and every fit (the variants of the report:
# attention.kind=mha; convert.init=random; attention.d_c=64 attention.d_r=32 for a milder compression); per fit
# STAGE_SECONDS (ADAPT_SECONDS, ODEINIT_SECONDS, SF_SECONDS: stop that fit with SIGUSR1 after so many seconds, it
# checkpoints and exits; empty = run to train.num_steps; CD_SECONDS too) and STAGE_ARGS (ADAPT_ARGS, ODEINIT_ARGS,
# CD_ARGS, SF_ARGS: extra key=value); CALIB_CLIPS [16]: encoded world clips the conversion factorises the
# activations of (0 = the weights' SVD); SF_FROM [ode_init]: the export self-forcing starts from; ODE_FROM
# [teacher]; ODE_PAIRS [4096] teacher trajectories; EVAL_PROMPTS [64]; EVAL_SECONDS [5.0625 = 81 frames];
# EVAL_ARGS (extra key=value for vmla-generate); STUDENT [sf]: which exported student the eval stage scores
# (converted adapt ode_init causal_cd sf).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORLD_DIR:-runs/world}
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
DEVICE=${DEVICE:-cuda}
STAGES=${*:-convert adapt ode odeinit sf eval}
has() { [[ " $STAGES " == *" $1 "* ]]; }
say() { echo "[$(date -u +%H:%M:%S)] world_student: $*"; }
for need in "$W/teacher" "$W/models" "$W/negative.safetensors"; do
  [[ -e "$need" ]] || { echo "world_student: $need is missing: build the teacher first (bash benchmarks/world_teacher.sh)" >&2; exit 2; }
done
SHARDS="data.shards=$W/train/raw-*.tar"
V="$W/${TAG:-mla}"  # this variant's runs and student folders
mkdir -p "$V"
source benchmarks/world_common.sh
STRIDE=$(stride)  # the codec's strides, as world_teacher.sh passes them to every stage

# timed STAGE COMMAND...: run a stage and add its wall seconds to $V/stage_seconds.json (summed over calls: a fit
# resumed in several calls counts them all; the bidirectional teacher's ODE pairs count where they were made)
timed() {
  local stage=$1 t0; t0=$(date +%s.%N); shift
  "$@"
  python3 - "$V/stage_seconds.json" "$stage" "$t0" "$(date +%s.%N)" <<'PY'
import json, os, sys
path, stage, t0, t1 = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
seconds = json.load(open(path)) if os.path.exists(path) else {}
seconds[stage] = round(seconds.get(stage, 0.0) + t1 - t0, 3)
with open(path + ".tmp", "w") as f:
    json.dump(seconds, f, indent=1)
os.replace(path + ".tmp", path)
PY
}

# fit STAGE CONFIG SECONDS ARGS...: one training stage in $V/STAGE, stopped by SIGUSR1 after SECONDS (if set),
# then exported to $V/student-STAGE (with EXPORT, e.g. --ema, passed to the export)
fit() {
  local stage=$1 config=$2 seconds=$3; shift 3
  local cmd=(vmla-train fit "$config" "runtime.run_dir=$V/$stage" "runtime.device=$DEVICE" "$STRIDE" ${STUDENT_ARGS:-} "$@")
  if [[ -n "$seconds" ]]; then
    # SIGUSR1 = Slurm's pre-emption notice: the fit checkpoints at the next step and exits 0
    timeout --signal=USR1 --kill-after=120 "$seconds" "${cmd[@]}" || [[ $? == 124 ]]
  else
    "${cmd[@]}"
  fi
  vmla-train export "$V/$stage" "$V/student-$stage" --overwrite ${EXPORT:-}
}

if has convert; then
  say "convert: teacher -> MLA student"
  # the spectral init from the teacher's K/V activations on the world's own clips (CALIB_CLIPS of them): on the
  # 15 944-iteration teacher its attention-output error is 0.23 against 0.57 from the weights' SVD
  # (benchmarks/README.md, "World student init"); CALIB_CLIPS=0: the weights' SVD
  CALIB=()
  (( ${CALIB_CLIPS:-16} > 0 )) && CALIB=(convert.factorization=activations "convert.calib_data=$W/train/raw-*.tar"
                                        "convert.calib_samples=${CALIB_CLIPS:-16}")
  timed convert vmla-convert "$W/teacher" "$V/student-converted" "$STRIDE" "${CALIB[@]}" ${STUDENT_ARGS:-} \
    --config configs/world/world-adapt.yaml --overwrite
fi
if has adapt; then
  say "adapt"
  timed adapt fit adapt configs/world/world-adapt.yaml "${ADAPT_SECONDS:-}" "train.student_path=$V/student-converted" "$SHARDS" \
    ${ADAPT_ARGS:-}
fi
# the bidirectional teacher's trajectories (shared by the variants), or the adapted causal student's (its own)
if [[ "${ODE_FROM:-teacher}" == teacher ]]; then ODE_SRC="$W/teacher" ODE_DIR="$W/ode"; else ODE_SRC="$V/student-$ODE_FROM" ODE_DIR="$V/ode"; fi
if has ode; then
  say "ODE pairs from $ODE_SRC"
  timed ode vmla-data ode-pairs data_prep/world.yaml "prep.ode.teacher=$ODE_SRC" "prep.ode.text_encoder=$W/models" \
    "prep.ode.input=$W/train/raw-*.tar" "prep.ode.output=$ODE_DIR" "prep.ode.max_samples=${ODE_PAIRS:-4096}" \
    "prep.ode.batch_size=${ODE_BATCH:-64}" "prep.ode.device=$DEVICE" "$STRIDE"
fi
if has odeinit; then
  say "ODE init"
  timed ode_init fit ode_init configs/world/world-ode_init.yaml "${ODEINIT_SECONDS:-}" "train.student_path=$V/student-adapt" \
    "data.shards=$ODE_DIR/ode-*.tar" ${ODEINIT_ARGS:-}
fi
if has cd; then
  say "causal consistency distillation"
  EXPORT=--ema timed causal_cd fit causal_cd configs/world/world-causal_cd.yaml "${CD_SECONDS:-}" "train.student_path=$V/student-adapt" \
    "$SHARDS" "dmd.negative_embedding=$W/negative.safetensors" ${CD_ARGS:-}
fi
if has sf; then
  say "self-forcing DMD"
  timed sf fit sf configs/world/world-self_forcing.yaml "${SF_SECONDS:-}" "train.student_path=$V/student-${SF_FROM:-ode_init}" \
    "train.teacher_path=$W/teacher" "train.critic_path=$W/teacher" "$SHARDS" \
    "dmd.negative_embedding=$W/negative.safetensors" "logging.vae_path=$W/models" ${SF_ARGS:-}
fi
if has eval; then
  S=${STUDENT:-sf}
  say "eval: ${TAG:-mla}/student-$S on held-out prompts"
  N=${EVAL_PROMPTS:-64}
  head -n "$N" "$W/clips/prompts-heldout.txt" > "$W/eval-prompts.txt"
  OUTD="$V/eval-student-$S-$(date -u +%Y%m%dT%H%M%S)"
  vmla-generate "$V/student-$S" "$W/eval-prompts.txt" "generate.out_dir=$OUTD" "generate.vae=$W/models" \
    "generate.text_encoder=$W/models" "generate.seconds=${EVAL_SECONDS:-5.0625}" "runtime.device=$DEVICE" \
    ${EVAL_ARGS:-}
  # the chunk-seam metric's geometry, from the student's config: latent frames per chunk, pixel frames per latent
  read -r CHUNK TSTRIDE < <(python3 -c "import sys, yaml; v = yaml.safe_load(open(sys.argv[1]))['video']; print(v['chunk_frames'], v['vae_stride'][0])" "$V/student-$S/config.yaml")
  vmla-world eval "$OUTD" --prompts "$W/eval-prompts.txt" --world "$W/clips" --out "$OUTD/report.json" \
    --chunk-frames "$CHUNK" --temporal-stride "$TSTRIDE"
  ln -sfn "$(basename "$OUTD")" "$V/eval-student-$S"
fi
say "done: $STAGES"
