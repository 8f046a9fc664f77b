#!/usr/bin/env bash
# Centralized baselines on ML-100K (DATA=folder with u.data/u.item; SHARED=folder with
# ml-100k-llm/ and ml-1m/ for the text descriptions and posters). Each run writes
# benchmarks/results/central_<variant>[TAG]_ml100k.json with the exact command inside; EXTRA adds
# flags (e.g. EXTRA="--lr 0.0002" TAG=_lr2e-4).
set -euo pipefail
DATA=${DATA:-data/ml-100k}
SHARED=${SHARED:-../shared/data}
which=${1:-sasrec}
case "$which" in
  sasrec)
    feddmmr train-central --dataset ml-100k --data-dir "$DATA" --variant sasrec \
      --stage-schedule pretrain:200 --eval-every 5 --patience 10 \
      --run-name central-sasrec --results-json benchmarks/results/central_sasrec_ml100k.json ;;
  full|no-proto|no-contrast)
    # Stages 2-3 start from the SASRec checkpoint of the run above (DESIGN §4: a checkpoint of
    # any stage can seed another run), so "full - sasrec" is the effect of the experts alone.
    feddmmr train-central --dataset ml-100k --data-dir "$DATA" --variant "$which" \
      --init-from "${INIT:-outputs/central-sasrec/best.pt}" \
      --descriptions "$SHARED/ml-100k-llm/item_descriptions.json" \
      --visual-features --posters-dir "$SHARED/ml-1m/posters" --movies-dat "$SHARED/ml-1m/movies.dat" \
      --stage-schedule "${SCHEDULE:-align:5,finetune:60}" --eval-every 5 --patience 4 \
      --run-name "central-$which${TAG:-}" --results-json "benchmarks/results/central_${which}${TAG:-}_ml100k.json" \
      ${EXTRA:-} ;;
  *) echo "usage: $0 [sasrec|full|no-proto|no-contrast]" >&2; exit 2 ;;
esac
