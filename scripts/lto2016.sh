#!/usr/bin/env bash
# Learning to Optimize (Li & Malik 2016), one objective family end to end:
#   1. tune gradient descent, momentum, CG and L-BFGS on the family's 90 training objectives
#      (configs/lto2016-FAMILY-tuning.toml -> configs/tuned-lto2016-FAMILY.json);
#   2. meta-train the 2016 policy with multi-condition GPS (configs/lto2016-FAMILY.toml), and copy
#      π to src/l2o/learned/weights/lto2016-FAMILY.safetensors;
#   3. benchmark the learned optimizer and the tuned baselines on 100 held-out test objectives
#      (T = 100, the trained horizon is 40);
#   4. report the mean margins (over T and over the first 40 iterations) and the mean curve figure.
# Every step resumes: rerunning skips finished tuning/benchmark runs; GPS resumes with RESUME=1.
# Usage: scripts/lto2016.sh FAMILY [STEP...]   (FAMILY: logreg | robust-linreg | smallnet;
#        STEP: tune train bench margin, default all four)
set -euo pipefail
cd "$(dirname "$0")/.."
fam=${1:?usage: scripts/lto2016.sh FAMILY [tune|train|bench|margin ...]}
shift
steps=${*:-tune train bench margin}
L2O=${L2O:-.venv/bin/l2o}
PY=${PY:-.venv/bin/python}
tuned=configs/tuned-lto2016-$fam.json
policy=src/l2o/learned/weights/lto2016-$fam.safetensors
bench=runs/lto2016-$fam-test
for step in $steps; do
  case $step in
    tune)
      $L2O tune --config "configs/lto2016-$fam-tuning.toml" --out "runs/lto2016-$fam-tuning" \
        --write "$tuned" --jobs 1 --quiet ;;
    train)
      $L2O meta-train gps2016 --config "configs/lto2016-$fam.toml" --out "runs/lto2016-$fam" \
        ${RESUME:+--resume}
      cp "runs/lto2016-$fam/policy.safetensors" "$policy" ;;
    bench)
      $L2O benchmark --tasks "$fam/test/0-99" --seeds 1 --iterations 100 --tuned "$tuned" \
        --optimizers sgd momentum cg lbfgs "lto2016:checkpoint=$policy" \
        --title "Learning to Optimize (2016): $fam, 100 held-out objectives" \
        --jobs "${JOBS:-2}" --quiet --out "$bench" > /dev/null ;;
    margin)
      $PY -m l2o.experiments.margin "$bench" --learned lto2016 --horizon 40 \
        --figure "docs/figures/lto2016-$fam.png" \
        --title "Learning to Optimize (2016), $fam: mean true objective over 100 held-out objectives" ;;
    *) echo "unknown step $step (tune, train, bench, margin)" >&2; exit 2 ;;
  esac
done
