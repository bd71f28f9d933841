#!/usr/bin/env bash
# Data preparation as a Slurm array job; with a given --tokenizer the result is byte-identical to
# `python -m data_prep build` on one machine with the same flags.
#
#   sbatch slurm/prep_data.sh --source wikipedia:DUMP --source text:BOOKS --out DATA [build flags]
#   sbatch --array=0-31 slurm/prep_data.sh ...        (32 tasks; default 8)
#
# Each array task runs `python -m data_prep build FLAGS --task I/N`: it reads, cleans and tokenizes
# only the units of the input (data_prep/units.py) whose index is I modulo N, saving their results
# in DATA/.array/ (data_prep/array.py). The first task submits the merge job (this script again,
# with PREP_DATA_MERGE=1) with a dependency on the whole array (afterok); the merge packs,
# shuffles and shards the saved results and writes DATA/manifest.json. With --vocab-size the array
# runs twice: in the first pass each task counts its units' words; the first task also submits the
# second pass (this script again, the same --array, PREP_DATA_PASS=2, afterok on the first), whose
# tasks train the vocabulary from all counts (every task gets the same one) and tokenize their
# units; the merge then waits for the second pass. A failed task cancels what depends on it;
# resubmitting the same command reuses every unit already saved. The array's task ids must be
# consecutive (a stepped or sparse --array is refused).
# DATA and this repository must be on a file system every node sees. Environment: PYTHON.
#SBATCH --job-name=prep_data
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

script=""
if [[ -n "${SLURM_JOB_ID:-}" ]]; then  # sbatch runs a copy from its spool: find the repository
    script="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p' | head -n 1)"
fi
if [[ -n "$script" && -f "$script" ]]; then
    ROOT="$(cd "$(dirname "$script")/.." && pwd)"
elif [[ -f "${SLURM_SUBMIT_DIR:-}/data_prep/build.py" ]]; then
    ROOT="$SLURM_SUBMIT_DIR"
else
    ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    script="$ROOT/slurm/prep_data.sh"
fi
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
workers="${SLURM_CPUS_PER_TASK:-$(nproc)}"

if [[ "${PREP_DATA_MERGE:-0}" == 1 ]]; then
    echo "prep_data.sh: merging the array's results" >&2
    exec "$PYTHON" -m data_prep build "$@" --workers "$workers"
fi
if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    echo "error: slurm/prep_data.sh is an array job: submit it with sbatch (or run" \
         "python -m data_prep build directly)" >&2
    exit 2
fi

task="$SLURM_ARRAY_TASK_ID"
count="${SLURM_ARRAY_TASK_COUNT:-1}"
first="${SLURM_ARRAY_TASK_MIN:-0}"
last="${SLURM_ARRAY_TASK_MAX:-$first}"
# Task I of N takes the units I modulo N: the ids must be N consecutive numbers (--array=8-15
# works too). A stepped or sparse array (0-30:2, 0,3,7) would leave units to tasks that never
# run: refused before anything is written (the merge is not submitted either).
if [[ $((last - first + 1)) -ne "$count" || "${SLURM_ARRAY_TASK_STEP:-1}" -ne 1 ]]; then
    echo "error: slurm/prep_data.sh needs consecutive array task ids (--array=A-B), got $count task(s) from" \
         "$first to $last${SLURM_ARRAY_TASK_STEP:+ in steps of $SLURM_ARRAY_TASK_STEP}: submit --array=0-$((count - 1))" >&2
    exit 2
fi
task=$((task - first))
if [[ "$task" -eq 0 && "${PREP_DATA_PASS:-1}" == 1 ]]; then
    same=(--cpus-per-task "${SLURM_CPUS_PER_TASK:-1}")  # the array's own resources, not the defaults
    [[ -n "${SLURM_JOB_PARTITION:-}" ]] && same+=(--partition "$SLURM_JOB_PARTITION")
    [[ -n "${SLURM_JOB_ACCOUNT:-}" ]] && same+=(--account "$SLURM_JOB_ACCOUNT")
    after="$SLURM_ARRAY_JOB_ID"
    if [[ " $* " == *" --vocab-size "* || " $* " == *" --vocab-size="* ]]; then
        after="$(sbatch --parsable --job-name "${SLURM_JOB_NAME:-prep_data}" --array "$first-$last" --ntasks 1 "${same[@]}" \
            --dependency "afterok:$SLURM_ARRAY_JOB_ID" --kill-on-invalid-dep=yes \
            --export "ALL,PREP_DATA_PASS=2" --output "${SLURM_JOB_NAME:-prep_data}-pass2-%A_%a.out" \
            "$ROOT/slurm/prep_data.sh" "$@")"
        echo "prep_data.sh: the second pass, array job $after, runs after array job $SLURM_ARRAY_JOB_ID" >&2
    fi
    merge="$(sbatch --parsable --job-name "${SLURM_JOB_NAME:-prep_data}-merge" --array 0 --ntasks 1 "${same[@]}" \
        --dependency "afterok:$after" --kill-on-invalid-dep=yes \
        --export "ALL,PREP_DATA_MERGE=1" --output "${SLURM_JOB_NAME:-prep_data}-merge-%A.out" \
        "$ROOT/slurm/prep_data.sh" "$@")"
    echo "prep_data.sh: merge job $merge runs after array job $after" >&2
fi
exec "$PYTHON" -m data_prep build "$@" --workers "$workers" --task "$task/$count"
