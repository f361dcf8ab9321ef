#!/usr/bin/env bash
# OPD vs SFT on teacher samples vs a warm start + OPD, at equal budget, on the real pair
# (docs/real_models.md §5). Fixed before it ran (committed first):
#   student   students/s26-angular: 26 of SmolLM2-135M-Instruct's 30 blocks (angular distance), untouched 0.048
#   budget    30 optimizer steps of 16 chat_basics prompts, lr 5e-5 (AdamW, constant), completions <= 24 tokens
#   opd       the default objective: exact full-vocabulary reverse KL on the student's own samples
#   sft       method=sft-teacher: next-token loss on the teacher's samples of the same prompts
#   warm+opd  sft-teacher for WARM = 10 steps, then the default OPD for the other 20 from that checkpoint
#   seeds     0 1 2; then examples/real_models/compare.py scores every final model on the 42 held-out questions
# Rerunning skips the runs that finished (their summary.json says "done").
#
#   bash examples/real_models/compare_methods.sh            # THREADS=1: one torch thread per run
set -euo pipefail
STUDENT=${STUDENT:-students/s26-angular}
OUT=${OUT:-runs/real-compare}
STEPS=${STEPS:-30}
WARM=${WARM:-10}
LR=${LR:-5e-5}
THREADS=${THREADS:-1}
SEEDS=${SEEDS:-"0 1 2"}

[ -d "$STUDENT" ] || opd make-student builtin:smollm2-135m-instruct "$STUDENT" --keep 26
common=(examples/real_models/distill.yaml "train.lr=$LR" eval.every=10 "train.threads=$THREADS" logging.report=false
        logging.progress=false)

run() {  # run DIR OVERRIDES...: one opd distill into DIR unless it already finished
  local dir=$1; shift
  if grep -qs '"status": "done"' "$dir/summary.json"; then echo "$dir: finished, skipped"; return; fi
  rm -rf "$dir"
  local start=$SECONDS
  opd distill "${common[@]}" "$@" "logging.run_dir=$dir" > "$dir.log" 2>&1
  echo "$dir: $((SECONDS - start)) s"
}

mkdir -p "$OUT"
for seed in $SEEDS; do
  run "$OUT/opd-seed$seed" "student.model=$STUDENT" "train.steps=$STEPS" "seed=$seed"
  run "$OUT/sft-seed$seed" "student.model=$STUDENT" method=sft-teacher "train.steps=$STEPS" "seed=$seed"
  run "$OUT/warm-seed$seed" "student.model=$STUDENT" method=sft-teacher "train.steps=$WARM" "seed=$seed"
  run "$OUT/warm-opd-seed$seed" "student.model=$OUT/warm-seed$seed/final" "train.steps=$((STEPS - WARM))" "seed=$seed"
done
finals=()
for seed in $SEEDS; do
  for m in opd sft warm warm-opd; do finals+=("$OUT/$m-seed$seed/final"); done
done
python examples/real_models/compare.py "$STUDENT" "${finals[@]}" --json "$OUT/compare.json" | tee "$OUT/compare.txt"
