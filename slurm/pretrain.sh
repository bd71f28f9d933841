#!/usr/bin/env bash
# EarlyBERT pre-training: the early-bird monitor beside the trainer, and the relaunch loop
# (searching stage -> ticket -> exit 76 -> efficient stage on the pruned model -> export).
#
#   bash slurm/pretrain.sh --deepspeed_config ds_configs/X.json --data DATA --run_dir RUN \
#       --model PRESET --max_steps N [any other pipeline/train.py flag]
#
# Outside Slurm it runs on this machine: every local GPU through torchrun, or one CPU process
# (NPROC=K overrides the number of processes). The run directory holds all state, so running
# the same command again continues a stopped run. Environment: PYTHON (default python3),
# MONITOR_FLAGS (extra flags for `python -m pipeline.monitor`, e.g. "--epsilon 0.05").
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
EXIT_RELAUNCH=76
MAX_LAUNCHES=5
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

run_dir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --run_dir) run_dir="${args[$((i + 1))]:-}" ;;
        --run_dir=*) run_dir="${args[$i]#--run_dir=}" ;;
    esac
done
if [[ -z "$run_dir" ]]; then
    echo "error: slurm/pretrain.sh needs the train flags, --run_dir RUN among them" >&2
    exit 2
fi

if [[ -n "${NPROC:-}" ]]; then
    nproc="$NPROC"
else
    nproc="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
fi
if [[ "$nproc" -ge 2 || ( "$nproc" -ge 1 && -n "$(command -v nvidia-smi)" ) ]]; then
    launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" "$ROOT/pipeline/train.py")
else
    launch=("$PYTHON" "$ROOT/pipeline/train.py")
fi

# The monitor watches RUN/gates/ and exits by itself when the search is over.
# shellcheck disable=SC2086
"$PYTHON" -m pipeline.monitor --run_dir "$run_dir" ${MONITOR_FLAGS:-} &
monitor=$!
trainer=""
forward() {  # a preemption warning or a stop request: the trainer checkpoints and exits 75
    [[ -n "$trainer" ]] && kill -s "$1" "$trainer" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM INT

rc=0
for ((launch_no = 1; launch_no <= MAX_LAUNCHES; launch_no++)); do
    pruned_before=0
    [[ -f "$run_dir/pruned/trainer_state.json" ]] && pruned_before=1
    "${launch[@]}" "$@" &
    trainer=$!
    while :; do
        wait "$trainer"
        rc=$?
        kill -0 "$trainer" 2>/dev/null || break  # wait returned early for a trapped signal
    done
    trainer=""
    # torchrun turns a worker's 76 into its own failure code, so the state of RUN decides too:
    # a pruned model that appeared during this launch means "relaunch".
    if [[ "$rc" -ne "$EXIT_RELAUNCH" ]] && ! [[ "$pruned_before" -eq 0 && -f "$run_dir/pruned/trainer_state.json" \
            && ! -f "$run_dir/finished.json" ]]; then
        break
    fi
    echo "pretrain.sh: ticket drawn and pruned model written; relaunching on the reduced model" >&2
done

kill "$monitor" 2>/dev/null
wait "$monitor" 2>/dev/null
if [[ -f "$run_dir/run.json" ]]; then
    "$PYTHON" -m pipeline.summary --run_dir "$run_dir"
fi
exit "$rc"
