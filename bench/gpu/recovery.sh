#!/usr/bin/env bash
# The recovery curve (bench/recovery.py) on a lent GPU, fp32 like the reference CPU, the steps set by the CPU's
# timings. Usage (device machine, repo root): bash bench/gpu/recovery.sh GGUF DATA_DIR TIMING_JSON RESULTS DEADLINE_S
set -u
gguf=$1; data=$2; timing=$3; results=$4; deadline=$5
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD/src" TOKENIZERS_PARALLELISM=false
sha256sum "$gguf"
python3 - "$gguf" <<'PY'
import sys, time
t = time.time()
from maskprune.models import load_model
load_model(sys.argv[1])  # converted once into the cache, so the parallel jobs only read it
print(f"converted in {time.time() - t:.0f} s")
PY
nvidia-smi --query-gpu=name,memory.used --format=csv
python3 bench/recovery.py --cpu-timing "$timing" --model "$gguf" --data-dir "$data" --work /tmp/rec \
  --results "$results" --jobs "${JOBS:-8}" --threads 2 --eval-batch 64 --deadline "$deadline" --date "$(date +%F)" \
  2>&1 | tee "$results/run.log"
tar czf "$results/logs.tgz" -C /tmp/rec logs 2>/dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv
