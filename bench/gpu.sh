#!/usr/bin/env bash
# The GPU check, prepared on a CPU machine by bench/gpu_prepare.sh (wheels in .whl/, data in
# bench/gpu_data/), run on a CUDA machine that reaches no package index:
#
#   bash bench/gpu.sh [PART] [OUT_DIR]     PART: tests | bench | all (default) | fidelity;
#                                           OUT_DIR: bench/out/gpu
#
# Installs DeepSpeed and its missing dependencies from .whl/ into a private directory (nothing
# is installed into the machine's Python; skipped when DeepSpeed already imports), runs the code
# from this checkout through PYTHONPATH, then
#   tests: the CUDA tests (tests/gpu, marked gpu): every shipped GPU config, fp16 overflow steps,
#          --compile, kill -9 and resume, the EarlyBERT loop, the attention paths, and fine-tuning
#          of a pruned export (plain PyTorch, DeepSpeed ZeRO-2/3 with a resume, EarlyBERT);
#   bench: bench/train_step.py (bert-base and bert-large, bf16, seq 128: ours vs transformers) and
#          bench/earlybird.py (bert-base, the paper's ticket, --ffn_multiple 1 and 64);
#   fidelity (a part of its own, not in all; at most 5 minutes): bench/fidelity.py's four arms of
#          pipeline.experiment (dense, earlybert, random, rewind) with bert-small on bench/gpu_data,
#          ds_configs/zero0_bf16.json with a 100-step warm-up, 1200 steps, the search at most 300,
#          --l1 7e-5 (outweighs bert-small's FFN gates as 1e-4 does bert-base's: bench/gate_grads.py).
# Prints a short table last and writes JSON (and logs) to OUT_DIR. Exit status: non-zero when a
# test or a benchmark failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PART="${1:-all}"
OUT_DIR="${2:-bench/out/gpu}"
PYTHON="${PYTHON:-python3}"
SITE="${GPU_SITE:-/tmp/earlybert-gpu-site}"
case "$PART" in tests|bench|all|fidelity) ;; *) echo "bench/gpu.sh: PART must be tests, bench, all or fidelity (got $PART)" >&2; exit 2 ;; esac
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

if ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "bench/gpu.sh: DeepSpeed is not installed and .whl/ holds no wheels: run bench/gpu_prepare.sh on a CPU machine and carry .whl" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ ! -f bench/gpu_data/manifest.json ]]; then
    echo "bench/gpu.sh: bench/gpu_data/ is missing: run bench/gpu_prepare.sh on a CPU machine and carry it" >&2
    exit 2
fi
"$PYTHON" - <<'EOF' | tee "$OUT_DIR/environment.txt"
import torch, deepspeed, transformers, sys
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  deepspeed {deepspeed.__version__}  "
      f"transformers {transformers.__version__}")
print(f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
EOF

status=0
t0=$SECONDS
if [[ "$PART" == fidelity ]]; then
    timeout 300 "$PYTHON" -m bench.fidelity --out "$OUT_DIR/fidelity" --data bench/gpu_data --model bert-small \
        --deepspeed_config ds_configs/zero0_bf16.json --warmup_steps 100 --budget_steps 1200 --search_max_steps 300 --l1 7e-5 \
        --json "$OUT_DIR/fidelity.json" 2>&1 | tee "$OUT_DIR/fidelity.log" | tail -12
    status="${PIPESTATUS[0]}"
    echo "total $((SECONDS - t0)) s"
    exit "$status"
fi
if [[ "$PART" != bench ]]; then
    xdist=()
    "$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n 4)  # small models: four at a time share the GPU
    timeout=()
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && timeout=(--timeout 300)
    "$PYTHON" -m pytest -q -m gpu tests/gpu "${xdist[@]}" "${timeout[@]}" -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" 2>&1 \
        | tee "$OUT_DIR/tests.log" | tail -40
    [[ "${PIPESTATUS[0]}" -eq 0 ]] || status=1
fi
t_tests=$((SECONDS - t0))
if [[ "$PART" != tests ]]; then
    timeout 240 "$PYTHON" -m bench.train_step --models bert-base bert-large --dtype bf16 --batch 128 --steps 10 \
        --data bench/gpu_data --compile --deepspeed ds_configs/zero0_bf16.json ds_configs/zero2_bf16.json --json "$OUT_DIR/train_step.json" 2>&1 | tee "$OUT_DIR/train_step.log" | tail -14
    [[ "${PIPESTATUS[0]}" -eq 0 ]] || status=1
    timeout 120 "$PYTHON" -m bench.earlybird --dtype bf16 --layers 12 --hidden 768 --heads 12 --ffn 3072 --batch 128 \
        --steps 10 --ffn_multiple 1 64 --out "$OUT_DIR/earlybird.json" 2>&1 | tee "$OUT_DIR/earlybird.log" | tail -6
    [[ "${PIPESTATUS[0]}" -eq 0 ]] || status=1
fi

"$PYTHON" - "$OUT_DIR" "$t_tests" "$((SECONDS - t0))" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
from bench.train_step import table
out, t_tests, t_all = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
summary = {"tests_s": t_tests, "total_s": t_all}
print("\n== GPU check summary ==")
if (out / "tests.xml").exists():
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    c = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [tc.get("name") for tc in suite.iter("testcase") if tc.find("failure") is not None or tc.find("error") is not None]
    summary["tests"] = {**c, "failed": failed}
    print(f"tests: {c['tests']} run, {c['failures'] + c['errors']} failed, {c['skipped']} skipped ({t_tests} s)"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
if (out / "train_step.json").exists():
    ts = json.loads((out / "train_step.json").read_text())
    summary["train_step"] = ts["results"]
    print(table(ts))
if (out / "earlybird.json").exists():
    eb = json.loads((out / "earlybird.json").read_text())
    summary["earlybird"] = eb["rows"]
    for r in eb["rows"]:
        print(f"earlybird {r['dtype']} ffn_multiple {r.get('ffn_multiple', 1)}: speed-up {r['realised_speedup']:.3f}, "
              f"FLOPs {r['flops_speedup']:.3f}, realised/predicted {r['realised_over_predicted']:.1%}")
print(f"total {t_all} s")
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
EOF
exit "$status"
