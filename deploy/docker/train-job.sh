#!/bin/sh
# The compose `trainer` job: train, fold and export a new version into the shared model
# repository, then ask the api to load it through the repository load API (no restart).
#   MODEL_NAME   model name in the repository (digits)
#   TRAIN_ARGS   extra `foldserve train` options, e.g. "--epochs 5 --model digits_cnn"
set -eu
name=${MODEL_NAME:-digits}
repository=${FOLDSERVE_REPOSITORY:-/models}
run=/runs/$name-$(date -u +%Y%m%dT%H%M%SZ)
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of options: split it on purpose
foldserve train --out "$run" --bn-recalibrate --no-progress ${TRAIN_ARGS:-}
foldserve export "$run/checkpoint.pt" --repository "$repository" --name "$name"
exec python /usr/local/lib/foldserve/load_model.py "$name"
