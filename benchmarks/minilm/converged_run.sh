#!/usr/bin/env bash
# Issue 12's whole MiniLM protocol, in order, from the repo root:
#
#     nohup bash benchmarks/minilm/converged_run.sh > converged_run.log 2>&1 &
#
# Every step keeps what it computed (models, statistics and evaluations under $TIESMERGE_BENCH_CACHE, finished
# AdaMerging runs in their JSON), so the same command, run again after a stop or on the next day, resumes where it
# stopped. On 2 CPU cores the fine-tuning takes about two hours, the rest many more: run it under `nice` beside
# other work. Environment: PYTHON (default .venv/bin/python), THREADS (torch threads, default 2),
# TIESMERGE_BENCH_CACHE (default ~/.cache/tiesmerge/bench; put it on a disk that survives the machine),
# STEPS (default "models rows learned table lora": a subset runs only those steps, in this order).
set -euo pipefail

PY=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-2}
STEPS=${STEPS:-models rows learned table lora}
export TIESMERGE_BENCH_MAX_LENGTH=${TIESMERGE_BENCH_MAX_LENGTH:-32}  # the converged protocol's length
# Table 1's evaluation: 500 test and 100 validation examples per task, grids thinned to 6 points and widened
# until no choice sits on an edge (at most 3 times), choices made on seed 0's validation data only
TABLE="--cached-only --seeds 0 1 2 --tune-seeds 0 --test-limit 500 --val-limit 100 --max-grid-points 6 \
--widen-rounds 3 --threads $THREADS"

step() {
    echo "[$(date -u +%F' '%T)] $*"
    "$@"
}

want() { [[ " $STEPS " == *" $1 "* ]]; }

if want models; then
    # seeds 0-2: the table's models (each seed's multitask model right after its tasks)
    step "$PY" benchmarks/minilm/finetune_all.py --seeds 0 1 2 --threads "$THREADS"
fi
if want rows; then
    # every registered method, defaults and validation rows; Fisher and RegMean on every seed
    # shellcheck disable=SC2086
    step "$PY" benchmarks/minilm/run.py $TABLE --skip-fig5 --adamerging
fi
if want learned; then
    # seeds 3, 4 are held out: the learned coefficients are re-measured on fine-tunes no choice has seen
    step "$PY" benchmarks/minilm/finetune_all.py --seeds 3 4 --no-multitask --threads "$THREADS"
    # AdaMerging (entropy on unlabeled test or validation inputs), then the coefficients learned over TSV-M's
    # components from labelled validation examples, fixed in advance and re-measured on held-out seeds 3 and 4
    for variants in val test; do
        step "$PY" benchmarks/minilm/adamerging.py --seeds 0 1 2 --variants "$variants" \
            --runs ties:layer task_arithmetic:task task_arithmetic:layer ties:task \
            --steps 40 --batch-size 8 --lr 0.01 --test-limit 500 --threads "$THREADS"
    done
    step "$PY" benchmarks/minilm/adamerging.py --seeds 0 1 2 3 4 --runs tsv_m:layer tsv_m:task \
        --variants val_labels --steps 100 --batch-size 16 --lr 0.01 --test-limit 500 --val-limit 300 \
        --threads "$THREADS" --out benchmarks/results/learned
fi
if want table; then
    # every result cached by now: the table with the learned rows, and Fig. 5 for the best methods
    # shellcheck disable=SC2086
    step "$PY" benchmarks/minilm/run.py $TABLE --fig5-limit 100 --fig5-subsets 2
fi
if want lora; then
    step "$PY" benchmarks/minilm/lora.py --threads "$THREADS"
fi
echo "[$(date -u +%F' '%T)] done: $STEPS"
