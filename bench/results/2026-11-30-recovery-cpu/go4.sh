#!/usr/bin/env bash
# issue 17, session 11 (end) and 12: run from the frozen worktree /tmp/wt17 (the code under test does not change under it)
cd /work/main
export PYTHONPATH=/tmp/wt17/src
exec .venv/bin/python /tmp/wt17/bench/recovery.py --cpu-timing bench/results/2026-11-30-recovery-cpu-timing.json \
  --model smollm2-135m --data-dir /work/shared/data --work runs/recovery17 --jobs 2 --threads 1 \
  --only '(distill|eval|piqa)-(default|flap)-s20-seed0-60min'
