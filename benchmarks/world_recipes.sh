#!/usr/bin/env bash
# The few-step recipes side by side on the world, each ending in the same self-forcing DMD budget, with the
# project's own commands (benchmarks/world_student.sh, one TAG per recipe), then scored by
# benchmarks/world_report.py (held-out prompts at the training length and at --long-seconds: prompt metrics,
# chunk seam jump, long-horizon drift; the wall seconds of each stage):
#
#   df-ode  diffusion-forcing adaptation (noisy earlier chunks) -> ODE init on the bidirectional teacher's
#           trajectories -> self-forcing (the pipeline's default)
#   tf-ode  teacher-forcing adaptation (clean earlier chunks) -> ODE init on the adapted causal student's own
#           cached rollouts (causal ODE) -> self-forcing
#   tf-cd   teacher-forcing adaptation -> causal consistency distillation (no ODE pairs) -> self-forcing
#   df-cd   diffusion-forcing adaptation -> causal consistency distillation -> self-forcing
#
#   bash benchmarks/world_recipes.sh [RECIPE ...]     (default: df-ode tf-ode tf-cd)
#
# Needs the world teacher (benchmarks/world_teacher.sh). Every recipe resumes like world_student.sh (run the
# same command again after an interruption). Settings (environment): WORLD_DIR [runs/world], the per-stage time
# limits and extra arguments of world_student.sh (ADAPT_SECONDS, ODEINIT_SECONDS, CD_SECONDS, SF_SECONDS, ...,
# the same for every recipe), STUDENT_ARGS (e.g. attention.kind=mha), REPORT_ARGS (extra world_report.py flags,
# e.g. --prompts 16 --long-seconds 20.25 --device cpu). Results: world_report.py's JSON under the name
# world_recipes (benchmarks/results/world_recipes-<device>.json).
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPES=${*:-df-ode tf-ode tf-cd}
for r in $RECIPES; do
  case $r in
    df-ode) ctx=diffusion_forcing init=ode ;;
    tf-ode) ctx=teacher_forcing init=ode ;;
    tf-cd) ctx=teacher_forcing init=cd ;;
    df-cd) ctx=diffusion_forcing init=cd ;;
    *) echo "world_recipes: unknown recipe '$r': use df-ode, tf-ode, tf-cd or df-cd" >&2; exit 2 ;;
  esac
  echo "[$(date -u +%H:%M:%S)] world_recipes: $r (adapt context $ctx, few-step init $init)"
  # the causal ODE: trajectories of the recipe's own adapted student; the default: the bidirectional teacher's
  if [[ $init == ode && $ctx == teacher_forcing ]]; then ode_from=adapt; else ode_from=teacher; fi
  if [[ $init == ode ]]; then stages="convert adapt ode odeinit sf"; sf_from=ode_init; else stages="convert adapt cd sf"; sf_from=causal_cd; fi
  TAG=$r ODE_FROM=$ode_from SF_FROM=$sf_from ADAPT_ARGS="train.context=$ctx ${ADAPT_ARGS:-}" \
    bash benchmarks/world_student.sh $stages
done
# shellcheck disable=SC2086  # REPORT_ARGS: flags, split on purpose
python3 benchmarks/world_report.py --world "${WORLD_DIR:-runs/world}" --variants $RECIPES --stage sf --no-rank \
  --eight-bit '' --baseline '' --main '' --name world_recipes ${REPORT_ARGS:-}
