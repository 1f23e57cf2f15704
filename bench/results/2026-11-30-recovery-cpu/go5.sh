#!/usr/bin/env bash
# issue 17, session 12: the cut-first in-budget arm (FLAP, then recovery for the rest of the default run's CPU
# minutes), 3 distillation seeds at 20 % and 50 %. Orchestration from /tmp/wt18 (f033b9e, which has the arm);
# the maskprune code from /tmp/wt17 (0c0f70e), the same as every other point of the curve.
# FLAP is deterministic (calibration windows do not depend on the seed): one prune per sparsity, linked as seeds 1, 2.
cd /work/main
export PYTHONPATH=/tmp/wt17/src
W=runs/inbudget17
B=(.venv/bin/python /tmp/wt18/bench/recovery.py --cpu-timing bench/results/2026-11-30-recovery-cpu-timing.json
   --model smollm2-135m --data-dir /work/shared/data --work $W --threads 1)
"${B[@]}" --jobs 1 --only 'prune-flap-s50-seed0'
ln -sfn /work/main/runs/recovery17/flap-s20-seed0 $W/flap-s20-seed0
for s in 1 2; do for t in s20 s50; do ln -sfn flap-$t-seed0 $W/flap-$t-seed$s; done; done
exec "${B[@]}" --jobs "${JOBS:-2}" \
  --only 'eval-flap-s50-seed0-inbudget,eval-flap-s20-seed0-inbudget,eval-flap-s50-seed1-inbudget,eval-flap-s20-seed1-inbudget,eval-flap-s50-seed2-inbudget,eval-flap-s20-seed2-inbudget'
