#!/usr/bin/env bash
# Training on the live testbed, measured: distr and qmix from scratch, qmix trained in the simulator and
# fine-tuned on the testbed, each evaluated against sed on 3 replays of a held-back trace window, and the
# report with the learning curves, step-interval CDFs and communication table (docs/benchmarks.md,
# "Training on the live testbed"). Root; about 45 minutes on a 2-core machine with the defaults.
#
#   sudo scripts/bench-live-training.sh                      # EPISODES=20 EPISODE_S=30 …
#   EPISODES=72 EPISODE_S=60 sudo scripts/bench-live-training.sh   # the papers' schedule (about 3 hours)
#   OUT=runs/live-training-… sudo scripts/bench-live-training.sh     # again: finished trainings are kept (--resume)
set -euo pipefail
CONFIG=${CONFIG:-configs/local-moderate.yaml}
OUT=${OUT:-runs/live-training-$(date +%Y%m%dT%H%M%S)}
EPISODES=${EPISODES:-20}
EPISODE_S=${EPISODE_S:-30}
SIM_EPISODES=${SIM_EPISODES:-40}
FINETUNE_EPISODES=${FINETUNE_EPISODES:-5}
EVAL_S=${EVAL_S:-30}
LOAD=${LOAD:-0.85}
HELD_BACK=${HELD_BACK:-traces/rate_200_steady_30s.tsv}  # training replays generated Poisson windows instead
MARLLB=${MARLLB:-.venv/bin/python -m marllb_cli}
HYPER=${HYPER:-}  # e.g. HYPER="--hyper residual=true --hyper levels=0.8,1,1.25"
trap '$MARLLB teardown $CONFIG' EXIT
$MARLLB deploy "$CONFIG"
$MARLLB calibrate "$CONFIG" --trace "$HELD_BACK" --target-load "$LOAD"
for algo in distr qmix; do
  $MARLLB train "$CONFIG" --env testbed --algo $algo --episodes "$EPISODES" --episode-s "$EPISODE_S" \
    --out "$OUT/$algo" --resume $HYPER
done
$MARLLB train "$CONFIG" --algo qmix --episodes "$SIM_EPISODES" --episode-s 60 --out "$OUT/qmix-sim" --resume $HYPER
$MARLLB train "$CONFIG" --env testbed --algo qmix --init "$OUT/qmix-sim" --episodes "$FINETUNE_EPISODES" \
  --episode-s "$EPISODE_S" --out "$OUT/qmix-finetuned" --resume $HYPER
rm -rf "$OUT/eval"
for seed in 1 2 3; do
  for method in sed "rl:$OUT/distr" "rl:$OUT/qmix" "rl:$OUT/qmix-sim" "rl:$OUT/qmix-finetuned"; do
    $MARLLB replay-trace "$CONFIG" --trace "$HELD_BACK" --method "$method" --load "$LOAD" --duration "$EVAL_S" \
      --seed $seed --runs-dir "$OUT/eval"
  done
done
$MARLLB report "$OUT/eval" "$OUT/distr" "$OUT/qmix" "$OUT/qmix-finetuned" --out "$OUT/report"
echo "results: $OUT/report/report.md"
