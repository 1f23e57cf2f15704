#!/usr/bin/env bash
# issue 17 on the reference CPU (2 threads): recovery of existing starts by maskprune distill, then ppl@2048
cd /work/main
M=".venv/bin/python -m maskprune -q"
W=runs/recovery-cpu
run() {  # name start steps
  name=$1; start=$2; steps=$3; calib=$(( steps * 4 > 256 ? steps * 4 : 256 ))
  if [ ! -f $W/$name/maskprune_report.json ]; then
    /usr/bin/time -f "%e s wall" $M distill $start --teacher smollm2-135m --steps $steps --seed 0 --calib-samples $calib \
      --out $W/$name --overwrite --eval-data none --no-report --threads 2 --dtype fp32 --weight-dtype fp32 > $W/$name.log 2>&1
  fi
  [ -f $W/$name.eval.json ] || $M eval $W/$name --seq-len 2048 --ppl-tokens 16384 --dtype fp32 --batch-size 4 --out $W/$name.eval.json >> $W/$name.log 2>&1
  echo "$(date +%T) done $name"
}
run flap-s50-5min runs/quality/q-flap-s50 90
run default-s50-5min runs/quality/q-maskprune-seed0-s50 93
run flap-s50-15min runs/quality/q-flap-s50 271   # interrupted, finished from its step-100 checkpoint with --resume
run flap-s20-15min runs/quality/q-flap-s20 212   # not run
run flap-s20-5min runs/quality/q-flap-s20 71
echo all done
