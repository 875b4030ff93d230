#!/usr/bin/env bash
# What ctbench prints for each bad input: the command, its output, its exit code.
#   bash benchmarks/bad_inputs.sh RUN_DIR > results/bad_input_messages.txt
# RUN_DIR: a trained run folder (for the certify cases). Nothing here trains for long: every
# command is refused before training starts.
set -u
RUN=${1:?usage: bad_inputs.sh RUN_DIR}
OUT=$(mktemp -d)
CTBENCH=${CTBENCH:-.venv/bin/ctbench}
try() {
  echo "\$ ctbench $*"
  "$CTBENCH" "$@" 2>&1 | grep -v -e "^\s" -e "^usage:" -e "^\s*$"
  echo "exit ${PIPESTATUS[0]}"
}
for setting in data.dataset=mnsit model.architecture=resnet18 method.name=ibpp optim.lrr=1e-3 \
               optim.batch_size=0 data.train_subset=-5 device=tpu optim.lr=1e38 optim.lr=.nan optim.lr=-1 \
               optim.lr=1e9 optim.epochs=0 eps.train_eps=-0.1 eps.train_eps=abc method.w_rob=1.5; do
  try train demo/ibp --quiet --set "$setting" --out "$OUT/train"
done
try train dmeo/ibp --out "$OUT/train"
for options in "--eps -0.1" "--eps nan" "--count 0" "--batch-size 0" "--timeout 0" "--stages ibp,foo" \
               "--stages ibq" "--start 20000"; do
  # shellcheck disable=SC2086
  try certify "$RUN" --quiet --count 2 $options --out "$OUT/certify"
done
try certify "$RUN" --quiet --count 4 --stages ibp --out "$OUT/mixed"
try certify "$RUN" --quiet --count 4 --stages ibp --eps 0.3 --out "$OUT/mixed"
try certify "$RUN" --quiet --count 20 --stages ibp --shard 0/2 --out "$OUT/half"
try certify-merge "$OUT/half"
rm -rf "$OUT"
