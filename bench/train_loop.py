"""The trainer's whole loop, timed from its own metrics: one checkout against another (a benchmark,
not a test).

Each checkout runs `python -m pipeline.train` (PYTHONPATH set to it) for --steps steps in a fresh run
directory with the same flags, alternating checkouts --repeats times; the median step_time_s after
the first --warmup steps is what a step costs, loader, logging, all-reduce and read-back
included. Prints a table and writes JSON.

    python -m bench.train_loop --checkout . --checkout /path/to/older/checkout \
        [--deepspeed_config ds_configs/cpu.json] [--model bert-mini] [--data DATA] [--steps 30]
Defaults: on CUDA bert-base with zero0_bf16.json and bench/gpu_data, else bert-mini with cpu.json
and a DATA you give.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the checkout: ds_configs/, bench/out/


def run_once(checkout: Path, a: argparse.Namespace, run_dir: Path) -> dict:
    path = os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "pipeline.train", "--deepspeed_config", str(a.deepspeed_config),
           "--data", str(a.data), "--run_dir", str(run_dir), "--model", a.model, "--max_steps", str(a.steps),
           "--earlybird", a.earlybird, "--eval_every", "0", "--checkpoint_every", str(10 * a.steps),
           "--eval_sequences", "8"]
    r = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=a.timeout)
    if r.returncode != 0:
        raise SystemExit(f"{checkout}: the trainer exited {r.returncode}:\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if "step_time_s" in x and x["step"] > a.warmup]
    return {"median_step_s": statistics.median(x["step_time_s"] for x in steps),
            "median_tokens_per_s": statistics.median(x["tokens_per_s"] for x in steps),
            "median_data_wait_s": statistics.median(x.get("data_wait_s", 0.0) for x in steps),
            "steps_timed": len(steps)}


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", type=Path, action="append", required=True, help="repeat: the checkouts to compare")
    p.add_argument("--deepspeed_config", type=Path,
                   default=ROOT / "ds_configs" / ("zero0_bf16.json" if cuda else "cpu.json"))
    p.add_argument("--model", default="bert-base" if cuda else "bert-mini")
    p.add_argument("--data", type=Path, default=ROOT / "bench" / "gpu_data" if cuda else None)
    p.add_argument("--earlybird", choices=("on", "off"), default="on", help="on: the searching stage (gates, L1)")
    p.add_argument("--steps", type=int, default=60 if cuda else 30)
    p.add_argument("--warmup", type=int, default=10 if cuda else 5, help="first steps left out of the median")
    p.add_argument("--repeats", type=int, default=2, help="runs per checkout, alternating")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "train_loop.json")
    a = p.parse_args()
    if a.data is None:
        p.error("--data is needed on a CPU (a data_prep output)")
    a.deepspeed_config = a.deepspeed_config.resolve()
    a.data = a.data.resolve()
    results = {str(c): [] for c in a.checkout}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for j, c in enumerate(a.checkout):
                results[str(c)].append(run_once(c.resolve(), a, Path(tmp) / f"run-{i}-{j}"))
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{a.model}, {a.deepspeed_config.name}, earlybird {a.earlybird}, {a.steps} steps "
          f"(median after step {a.warmup}), {a.repeats} runs each, {device}")
    print("| checkout | median s/step (each run) | tokens/s | data wait s | / first |")
    print("|---|---|---|---|---|")
    first = None
    for c, runs in results.items():
        step = statistics.median(r["median_step_s"] for r in runs)
        first = first or step
        each = ", ".join(f"{r['median_step_s']:.4f}" for r in runs)
        print(f"| {c} | {step:.4f} ({each}) | "
              f"{statistics.median(r['median_tokens_per_s'] for r in runs):,.0f} | "
              f"{statistics.median(r['median_data_wait_s'] for r in runs):.4f} | {step / first:.3f} |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"device": device, "model": a.model, "config": a.deepspeed_config.name,
                                  "steps": a.steps, "warmup": a.warmup, "results": results}, indent=2) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
