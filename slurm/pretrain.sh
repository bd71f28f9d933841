#!/usr/bin/env bash
# EarlyBERT pre-training: the early-bird monitor beside the trainer, and the relaunch loop
# (searching stage -> ticket -> exit 76 -> efficient stage on the pruned model -> export).
#
#   sbatch slurm/pretrain.sh --deepspeed_config ds_configs/X.json --data DATA --run_dir RUN \
#       --model PRESET --max_steps N [any other pipeline/train.py flag]
#   bash slurm/pretrain.sh ...            (the same on this machine, without Slurm)
#
# The defaults below are for one typical 8-GPU node; override any of them on the sbatch command
# line (`sbatch -N 4 --gpus-per-node 4 --time 12:00:00 slurm/pretrain.sh ...`). For a cluster:
#   --partition / --account / --qos  where you may run (add them);
#   --gpus-per-node, --cpus-per-task  what one node has: one task per node runs torchrun, which
#                                     starts one training process per GPU (no ssh between nodes:
#                                     the ranks meet at a c10d rendezvous on the first node);
#   --time                            the limit; a longer run is requeued and continues from RUN;
#   --signal=B:USR1@SECONDS           the warning before the limit or a preemption: the trainer
#                                     checkpoints at its next step boundary and the job requeues
#                                     itself; SECONDS must cover one step plus a checkpoint.
# RUN, DATA and this repository must be on a file system every node sees.
#SBATCH --job-name=earlybert
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Environment: PYTHON (default python3), NPROC (training processes per node; default the GPUs,
# else 1 process on the CPU), MONITOR_FLAGS (extra `python -m pipeline.monitor` flags),
# LOG_DIR (Slurm: per-stage logs, default logs/).
set -uo pipefail

in_slurm=0
[[ -n "${SLURM_JOB_ID:-}" ]] && in_slurm=1
script=""
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "$in_slurm" -eq 1 && ! -f "$here/pipeline/train.py" ]]; then  # sbatch runs a copy from its spool
    script="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')"
fi
if [[ -f "$here/pipeline/train.py" ]]; then  # run from a checkout (bash slurm/pretrain.sh, or exec'd by a job)
    ROOT="$here"
elif [[ -n "$script" && -f "$script" ]]; then
    ROOT="$(cd "$(dirname "$script")/.." && pwd)"
elif [[ "$in_slurm" -eq 1 && -f "${SLURM_SUBMIT_DIR:-}/pipeline/train.py" ]]; then  # a checkout there
    ROOT="$SLURM_SUBMIT_DIR"
else
    ROOT="$here"
fi
PYTHON="${PYTHON:-python3}"
EXIT_RELAUNCH=76
MAX_LAUNCHES=5
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "pretrain.sh: $*" >&2; }

run_dir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --run_dir) run_dir="${args[$((i + 1))]:-}" ;;
        --run_dir=*) run_dir="${args[$i]#--run_dir=}" ;;
    esac
done
if [[ -z "$run_dir" ]]; then
    log "error: the train flags are needed, --run_dir RUN among them"
    exit 2
fi

if [[ -n "${NPROC:-}" ]]; then
    nproc="$NPROC"
elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    nproc="$SLURM_GPUS_ON_NODE"
else
    nproc="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
fi
[[ "$nproc" -ge 1 ]] 2>/dev/null || nproc=1

if [[ "$in_slurm" -eq 1 ]]; then
    nodes="${SLURM_JOB_NUM_NODES:-1}"
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    node_addr() { scontrol show node "$1" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p'; }
    first_addr="$(node_addr "$first")"
    port=$((20000 + SLURM_JOB_ID % 20000))
    log_dir="${LOG_DIR:-logs}"
    mkdir -p "$log_dir"
    # Each node's torchrun advertises the node's Slurm address (NodeAddr), not whatever its
    # host name resolves to there; the first node hosts the rendezvous store at its address
    # (said explicitly: torchrun's guess compares host names).
    # shellcheck disable=SC2016  # the single-quoted script expands on each node, not here
    launch=(srun --nodes "$nodes" --ntasks-per-node 1 --kill-on-bad-exit=1 --open-mode=append
            bash -c 'addr="$(scontrol show node "$SLURMD_NODENAME" | sed -n "s/.*NodeAddr=\([^ ]*\).*/\1/p")"
                     host=false; [[ "$SLURM_NODEID" == 0 ]] && host=true
                     exec "$0" -m torch.distributed.run --local_addr "${addr:-$(hostname)}" \
                         --rdzv_conf "is_host=$host" "$@"'
            "$PYTHON" --nnodes "$nodes" --nproc_per_node "$nproc"
            --rdzv_backend c10d --rdzv_endpoint "${first_addr:-$first}:$port" --rdzv_id "$SLURM_JOB_ID"
            -m pipeline.train)
    monitor_log="$log_dir/$SLURM_JOB_NAME-$SLURM_JOB_ID-monitor.log"
    log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s) x $nproc process(es), rendezvous ${first_addr:-$first}:$port"
elif [[ "$nproc" -ge 2 || -n "$(command -v nvidia-smi)" ]]; then
    launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m pipeline.train)
    monitor_log=/dev/stderr
else
    launch=("$PYTHON" -m pipeline.train)
    monitor_log=/dev/stderr
fi

# The monitor watches RUN/gates/ and exits by itself when the search is over; under Slurm it
# runs here, on the first node.
# shellcheck disable=SC2086
"$PYTHON" -m pipeline.monitor --run_dir "$run_dir" ${MONITOR_FLAGS:-} >>"$monitor_log" 2>&1 &
monitor=$!
trainer=""
stop_asked=0
# shellcheck disable=SC2317  # reached through the traps below
ask_to_stop() {  # Slurm's warning (USR1), or TERM/INT: checkpoint at the next step boundary
    stop_asked=1
    log "received $1: the trainer checkpoints at its next step boundary"
    if [[ -d "$run_dir" ]]; then
        : >"$run_dir/stop"  # a file in RUN reaches every rank on every node
    elif [[ -n "$trainer" ]]; then
        kill -s "$1" "$trainer" 2>/dev/null
    fi
}
trap 'ask_to_stop USR1' USR1
trap 'ask_to_stop TERM' TERM
trap 'ask_to_stop INT' INT
rm -f "$run_dir/stop"  # a request a killed launch never saw

# RUN/launches.jsonl: each launch's wall clock, start-up and exit included (pipeline.experiment adds
# them up). Only a launch that got as far as RUN/run.json is recorded: bad input leaves RUN as it was.
record_launch() {
    [[ -f "$run_dir/run.json" ]] || return 0
    printf '{"start": %s, "end": %s, "stage": "%s", "rc": %s, "host": "%s"}\n' \
        "$1" "$(date +%s.%N)" "$2" "$3" "$(hostname)" >>"$run_dir/launches.jsonl"
}

rc=0
for ((launch_no = 1; launch_no <= MAX_LAUNCHES; launch_no++)); do
    stage="$("$PYTHON" -m pipeline.run_dir --stage "$run_dir")" || { rc=2; break; }
    [[ "$stage" == new ]] && stage=search  # the log's name: this launch starts the search
    started="$(date +%s.%N)"
    if [[ "$in_slurm" -eq 1 ]]; then
        "${launch[@]:0:1}" --output "$log_dir/$SLURM_JOB_NAME-$SLURM_JOB_ID-$stage.log" \
            "${launch[@]:1}" "$@" &
    else
        "${launch[@]}" "$@" &
    fi
    trainer=$!
    while :; do
        wait "$trainer"
        rc=$?
        kill -0 "$trainer" 2>/dev/null || break  # wait returned early for a trapped signal
    done
    trainer=""
    record_launch "$started" "$stage" "$rc"
    [[ "$stop_asked" -eq 1 ]] && break
    # torchrun turns a worker's 76 into its own failure code, so the state of RUN decides too:
    # a search launch that left RUN at the efficient stage means "relaunch".
    if [[ "$rc" -ne "$EXIT_RELAUNCH" ]] && ! [[ "$stage" == search \
            && "$("$PYTHON" -m pipeline.run_dir --stage "$run_dir")" == efficient ]]; then
        break
    fi
    log "ticket drawn and pruned model written; relaunching on the reduced model"
done

kill "$monitor" 2>/dev/null
wait "$monitor" 2>/dev/null
if [[ "$stop_asked" -eq 1 && ! -f "$run_dir/finished.json" ]]; then
    if [[ "$in_slurm" -eq 1 ]]; then
        log "stopped with a checkpoint; requeueing job $SLURM_JOB_ID to continue"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    log "stopped with a checkpoint; run the same command to continue"
    exit 75
fi
if [[ -f "$run_dir/run.json" ]]; then
    "$PYTHON" -m pipeline.summary --run_dir "$run_dir"
fi
exit "$rc"
