#!/usr/bin/env bash
# CUDA smoke test of every path the recovery curve uses (prune learned + FLAP, distill, eval with PIQA) on a
# tiny random Llama, before the real run spends device time. Usage: bash bench/gpu/smoke.sh DATA_DIR WORK
set -euo pipefail
data=$1; w=$2; mkdir -p "$w"
${PY:-python3} - "$w" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
import tiny
w = Path(sys.argv[1])
tiny.save_tiny(w / "dense", "llama_gqa")
tiny.write_calib(w / "calib.jsonl")
PY
M="${PY:-python3} -m maskprune -q"
F="--calib $w/calib.jsonl --calib-samples 8 --seq-len 32 --batch-size 2 --eval-data none --no-report --overwrite"
$M prune "$w/dense" --sparsity 0.3 --steps 3 --out "$w/p" $F
$M prune "$w/dense" --sparsity 0.3 --method flap --out "$w/f" $F
$M distill "$w/p" --teacher "$w/dense" --steps 3 --out "$w/d" $F
$M eval "$w/d" --seq-len 64 --ppl-tokens 256 --tasks piqa --data-dir "$data" --limit 8 --dtype fp32 --out "$w/e.json"
${PY:-python3} -c "import json,sys; r=json.load(open('$w/e.json')); print('smoke ok', json.dumps(r['models'])[:300])"
