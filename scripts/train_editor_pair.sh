#!/usr/bin/env bash
# Train two KnowledgeEditors for one model side by side, with the same data, settings and wall time:
# the paper's single-edit objective and the sequence objective (edits applied in the loop), so that
# `kbsync eval --sequential` can compare how each stacks. Runs on whatever [model] device says
# (KBSYNC_MODEL_DEVICE=cuda on a GPU); fails fast if either run dies.
#   scripts/train_editor_pair.sh MODEL_DIR DATA OUT_DIR SECONDS [extra `editor train` options]
set -uo pipefail
[ $# -ge 4 ] || { echo "usage: $0 MODEL_DIR DATA OUT_DIR SECONDS [options]" >&2; exit 2; }
model=$1 data=$2 out=$3 seconds=$4
shift 4
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && py=${PYTHON:-.venv/bin/python}
common=(train --model "$model" --data "$data" --limit "${LIMIT:-3000}" --paraphrases --lagrange-init 1
        --steps 1000000 --batch 8 --checkpoint-every 50 --eval-every "${EVAL_EVERY:-100}"
        --eval-sequence "${SEQUENCE:-30}" --max-seconds "$seconds" "$@")
mkdir -p "$out/single" "$out/sequence"
"$py" -m kbsync.commands.editor "${common[@]}" --out "$out/single" > "$out/single.log" 2>&1 &
single=$!
"$py" -m kbsync.commands.editor "${common[@]}" --sequence "${SEQUENCE:-30}" --out "$out/sequence" > "$out/sequence.log" 2>&1 &
sequence=$!
status=0
while kill -0 "$single" 2>/dev/null || kill -0 "$sequence" 2>/dev/null; do
    sleep 5
    for pid in "$single" "$sequence"; do
        if ! kill -0 "$pid" 2>/dev/null && ! wait "$pid"; then
            echo "a training run failed; stopping both" >&2
            kill "$single" "$sequence" 2>/dev/null
            status=1
        fi
    done
    [ $status -ne 0 ] && break
done
wait "$single"; s1=$?
wait "$sequence"; s2=$?
for run in single sequence; do
    echo "== $run: $(tail -n 1 "$out/$run/metrics.jsonl" 2>/dev/null)"
    tail -n 3 "$out/$run.log"
done
[ $status -eq 0 ] && [ $s1 -eq 0 ] && [ $s2 -eq 0 ]
