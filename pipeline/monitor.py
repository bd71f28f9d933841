"""The early-bird monitor: a process beside the trainer that watches a searching run's gates.

    python -m pipeline.monitor --run_dir RUN [--prune_heads K] [--prune_ffn P] [--ffn_multiple N]
        [--min_steps N] [--window 5] [--epsilon 0.1] [--poll SECONDS]

It reads RUN/gates/step-*.npz as the trainer writes them, draws each snapshot's masks, applies
the early-bird rule and writes RUN/ticket.json when the rule fires (the trainer applies the same
rule to the same snapshot and takes the ticket at its step, so the decision never waits on this
process). RUN/earlybird/ keeps the
record: distances.jsonl (one row per snapshot) and PNG plots (pairwise step x step mask
distances for heads and FFN, distance to the previous mask, the ticket's shape, gate histograms).
When the trainer logs to W&B (RUN/wandb.json), the same goes to a W&B run in its group.

Its settings are the trainer's, from RUN/search.json (pipeline.settings.SearchSettings: --prune_heads,
--prune_ffn, --ffn_multiple, --search_min_steps as --min_steps, --window, --epsilon); the flags
here override them for experiments: they change what it shows and the ticket it would write, not
the trainer's decision. An older run's search.json without ffn_multiple means 1. A snapshot read
before that disappears or is written again (a trainer resumed from an earlier checkpoint) makes
it start over.
Everything is rebuilt from the snapshots at start, so a killed monitor restarted reaches the same
decision. It exits by itself once the run has left the searching stage
(a ticket is in place, RUN/pruned/ or RUN/finished.json exists, or the run does not search).
Exit codes: 0 done; 2 bad input (a flag out of range, an unreadable snapshot).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from data_prep.files import atomic_write_bytes
from pipeline.earlybird import EarlyBirdRule, draw_masks
from pipeline.errors import UserError, exit_on_user_error
from pipeline.run_dir import RunDir, SearchRecord, ticket_record
from pipeline.settings import SearchSettings

# The monitor's flag -> the SearchSettings field it overrides (RUN/search.json gives the rest).
OVERRIDES = {"prune_heads": "prune_heads", "prune_ffn": "prune_ffn", "ffn_multiple": "ffn_multiple",
             "min_steps": "search_min_steps", "window": "window", "epsilon": "epsilon"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, type=Path)
    p.add_argument("--prune_heads", type=int, default=None, help="heads dropped per layer")
    p.add_argument("--prune_ffn", type=float, default=None, help="fraction of FFN neurons dropped, globally")
    p.add_argument("--ffn_multiple", type=int, default=None,
                   help="each layer's FFN width a multiple of this (or the layer's full size); 1: any width")
    p.add_argument("--min_steps", type=int, default=None, help="the rule does not fire before this step")
    p.add_argument("--window", type=int, default=None, help="masks compared (FIFO; default 5)")
    p.add_argument("--epsilon", type=float, default=None,
                   help="largest distance that counts as stable (default 0.1)")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between looks at RUN/gates/")
    a = p.parse_args(argv)
    try:  # the same checks as the trainer's flags, on the flags given
        with_flags(SearchRecord(SearchSettings(), [], []), a)
    except UserError as e:
        p.error(str(e))
    return a


def with_flags(search: SearchRecord, a: argparse.Namespace, where: str | None = None) -> SearchRecord:
    """RUN/search.json's settings with the monitor's flags over them, checked (`where`: the file,
    named in the error)."""
    given = {field: getattr(a, flag) for flag, field in OVERRIDES.items() if getattr(a, flag) is not None}
    settings = dataclasses.replace(search.settings, **given)
    try:
        settings.check()
        settings.check_model(search.heads)
    except UserError as e:
        raise UserError(f"{where} with the flags given: {e}" if where else str(e)) from None
    return SearchRecord(settings, search.heads, search.ffn)


class Monitor:
    def __init__(self, run: RunDir, search: SearchRecord):
        s = search.settings
        self.run, self.heads_n, self.ffn_n = run, search.heads, search.ffn
        self.prune_heads, self.prune_ffn, self.ffn_multiple = s.prune_heads, s.prune_ffn, s.ffn_multiple
        self.rule = EarlyBirdRule.for_search(s)
        self.fingerprint = run.fingerprint()
        self.wandb = None
        self.logged_step = -1
        self.reset()

    def reset(self) -> None:
        """Forget every snapshot (a resumed trainer replaced the ones after its checkpoint)."""
        self.rule.history.clear()
        self.rows: list[dict] = []
        self.masks: list[tuple[int, list, list]] = []
        self.latest_gates = None
        self.seen_files: dict[int, tuple[int, int]] = {}  # step -> (inode, mtime) of what was read

    def stale(self, paths: list[tuple[int, Path]]) -> bool:
        """Whether a snapshot read before is gone or was written again."""
        now = {s: p for s, p in paths}
        for step, ident in self.seen_files.items():
            try:
                st = now[step].stat()
            except (KeyError, OSError):
                return True
            if (st.st_ino, st.st_mtime_ns) != ident:
                return True
        return False

    def process(self, step: int, path: Path) -> bool:
        """The rule on one snapshot; False when it vanished (a resuming trainer removes the
        snapshots after its checkpoint, maybe between the listing and this read)."""
        try:
            st = path.stat()
            heads_g, ffn_g = self.run.read_snapshot(path, len(self.heads_n), (self.heads_n, self.ffn_n))
        except (OSError, UserError):
            if path.exists():
                raise
            return False
        self.seen_files[step] = (st.st_ino, st.st_mtime_ns)
        heads, ffn = draw_masks(heads_g, ffn_g, self.prune_heads, self.prune_ffn, self.ffn_multiple)
        reason, d = self.rule.update(step, heads, ffn, (heads_g, ffn_g))
        row = {"step": step,
               "heads_to_previous": d["heads"][-1] if d["heads"] else None,
               "ffn_to_previous": d["ffn"][-1] if d["ffn"] else None,
               "heads_window_max": max(d["heads"]) if d["heads"] else None,
               "ffn_window_max": max(d["ffn"]) if d["ffn"] else None,
               "heads_near_ties": d["ties_heads"], "ffn_near_ties": d["ties_ffn"],
               "kept_heads": [int(h.sum()) for h in heads], "ffn_width": [int(f.sum()) for f in ffn],
               "fired": reason}
        self.rows.append(row)
        self.masks.append((step, heads, ffn))
        self.latest_gates = (heads_g, ffn_g)
        if reason is not None and not self.run.ticket.exists():
            recent = [{"step": r["step"], "heads": r["heads_to_previous"], "ffn": r["ffn_to_previous"]}
                      for r in self.rows[-self.rule.window:]]
            self.run.publish_ticket(ticket_record(step, reason, "monitor", self.fingerprint,
                                                          heads, ffn, recent))
            print(f"monitor: ticket at step {step}: {reason}", file=sys.stderr, flush=True)
        return True

    def pairwise(self, part: int) -> np.ndarray:
        """Step x step normalised Hamming distances of the head (part 1) or FFN (part 2) masks."""
        x = np.stack([np.concatenate(m[part]) for m in self.masks]).astype(np.float32)
        return (x @ (1 - x).T + (1 - x) @ x.T) / x.shape[1]

    def write_record(self, ticket: int | None) -> None:
        out = self.run.earlybird
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "distances.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        if self.masks:
            for name, fig in self.figures(ticket).items():
                tmp = out / f".{name}.tmp.png"
                fig.savefig(tmp, dpi=100)
                os.replace(tmp, out / name)
            import matplotlib.pyplot as plt
            plt.close("all")

    def figures(self, ticket: int | None) -> dict:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        steps = [m[0] for m in self.masks]
        figs = {}
        for part, name in ((1, "heads"), (2, "ffn")):
            fig, ax = plt.subplots(figsize=(5.5, 4.5))
            half = (steps[-1] - steps[0]) / max(len(steps) - 1, 1) / 2 or 0.5  # cells centred on steps
            lo, hi = steps[0] - half, steps[-1] + half
            im = ax.imshow(self.pairwise(part), cmap="viridis", vmin=0, extent=(lo, hi, hi, lo))
            fig.colorbar(im, ax=ax, label="mask distance")
            if ticket is not None:
                ax.axvline(ticket, color="red", lw=1)
                ax.axhline(ticket, color="red", lw=1)
            ax.set(title=f"pairwise {name} mask distance", xlabel="step", ylabel="step")
            fig.tight_layout()
            figs[f"pairwise_{name}.png"] = fig
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label, style in (("heads_to_previous", "heads", "-"), ("ffn_to_previous", "FFN", "-"),
                                  ("heads_near_ties", "heads: near-ties", ":"), ("ffn_near_ties", "FFN: near-ties", ":")):
            pts = [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", ls=style, label=label)
        ax.axhline(self.rule.epsilon, color="gray", ls="--", lw=1, label="epsilon")
        if ticket is not None:
            ax.axvline(ticket, color="red", lw=1, label=f"ticket (step {ticket})")
        ax.set(title="distance to the previous mask; near-ties (fraction)", xlabel="step", ylabel="fraction of units")
        ax.legend()
        fig.tight_layout()
        figs["distance_to_previous.png"] = fig
        last = self.rows[-1]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
        layers = np.arange(len(self.heads_n))
        a1.bar(layers, self.heads_n, color="lightgray", label="dense")
        a1.bar(layers, last["kept_heads"], label="kept")
        a1.set(title="heads per layer", xlabel="layer")
        a2.bar(layers, self.ffn_n, color="lightgray", label="dense")
        a2.bar(layers, last["ffn_width"], label="kept")
        a2.set(title="FFN width per layer", xlabel="layer")
        a1.legend()
        fig.suptitle(f"masks of step {last['step']}")
        fig.tight_layout()
        figs["ticket_shape.png"] = fig
        heads_g, ffn_g = self.latest_gates
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
        a1.hist(np.concatenate(heads_g), bins=40)
        a1.set(title="|head gate|", xlabel="value")
        a2.hist(np.concatenate(ffn_g), bins=60)
        a2.set(title="|FFN gate|", xlabel="value")
        fig.suptitle(f"gates at step {last['step']}")
        fig.tight_layout()
        figs["gate_histograms.png"] = fig
        return figs

    # -- W&B: a run of its own in the trainer's group, so both show on one dashboard
    def start_wandb(self) -> None:
        info = self.run.read_wandb()
        mode = os.environ.get("WANDB_MODE") or (info or {}).get("mode")
        if info is None or mode == "disabled":
            return
        import wandb
        self.wandb = wandb.init(project=info["project"], entity=info["entity"], group=info["group"],
                                id=f"{info['id']}-earlybird", name=f"{info['id']}-earlybird",
                                job_type="earlybird", resume="allow", mode=mode or info.get("mode"),
                                dir=str(self.run.earlybird))
        self.logged_step = self.wandb.step - 1  # a restart does not log steps twice

    def log_wandb(self, new_rows: list[dict], ticket: int | None) -> None:
        if self.wandb is None:
            return
        import wandb
        out = self.run.earlybird
        for i, r in enumerate(new_rows):
            if r["step"] <= self.logged_step:
                continue
            row = {"earlybird/heads_to_previous": r["heads_to_previous"],
                   "earlybird/ffn_to_previous": r["ffn_to_previous"],
                   "earlybird/heads_window_max": r["heads_window_max"],
                   "earlybird/ffn_window_max": r["ffn_window_max"]}
            row.update({f"earlybird/kept_heads/layer_{j}": k for j, k in enumerate(r["kept_heads"])})
            row.update({f"earlybird/ffn_width/layer_{j}": k for j, k in enumerate(r["ffn_width"])})
            row = {k: v for k, v in row.items() if v is not None}
            if i == len(new_rows) - 1:  # the newest snapshot carries the plots
                heads_g, ffn_g = self.latest_gates
                row["earlybird/head_gates"] = wandb.Histogram(np.concatenate(heads_g))
                row["earlybird/ffn_gates"] = wandb.Histogram(np.concatenate(ffn_g))
                for name in ("pairwise_heads", "pairwise_ffn", "distance_to_previous", "ticket_shape"):
                    if (out / f"{name}.png").exists():
                        row[f"earlybird/{name}"] = wandb.Image(str(out / f"{name}.png"))
            if ticket is not None and r["step"] == ticket:
                row["earlybird/ticket"] = 1
                self.wandb.summary["ticket_step"] = ticket
            self.wandb.log(row, step=r["step"])
            self.logged_step = r["step"]

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def settled(run: RunDir, ticket: int | None) -> bool:
    """Whether the ticket is one no resume can discard: a checkpoint of its step or later holds it.
    A ticket past the last checkpoint may belong to a trajectory the next launch drops (with the
    snapshots after that checkpoint): the monitor watches on, and starts over when it goes."""
    if ticket is None:
        return False
    try:
        latest = run.latest_checkpoint()
    except UserError:  # latest.json damaged: the trainer reports it; keep watching
        return False
    return latest is not None and latest["step"] >= ticket


@exit_on_user_error
def main(argv=None) -> int:
    a = parse_args(argv)
    run = RunDir(a.run_dir)
    while (search := run.read_search()) is None or run.read_identity() is None:
        if (why := run.left_search()) is not None:
            print(f"monitor: {run.path}: {why}; nothing to watch", file=sys.stderr)
            return 0
        time.sleep(a.poll)  # the trainer has not started its search yet
    m = Monitor(run, with_flags(search, a, str(run.search_json)))
    try:
        m.start_wandb()
        while True:
            paths = run.snapshot_paths()
            if m.stale(paths):  # the trainer resumed before snapshots it had written: start over
                print("monitor: snapshots were replaced (the trainer resumed); rebuilding", file=sys.stderr)
                m.reset()
            ticket = run.ticket_step()
            seen = m.rows[-1]["step"] if m.rows else -1
            new = [(s, p) for s, p in paths if s > seen and (ticket is None or s <= ticket)]
            for i, (step, path) in enumerate(new):
                if not m.process(step, path):
                    print("monitor: a snapshot vanished (the trainer resumed); rebuilding", file=sys.stderr)
                    m.reset()
                    new = []
                    break
                if ticket is None and run.ticket.exists():  # drawn now: later snapshots do not count
                    new = new[:i + 1]
                    break
            if ticket is None:  # written once: only a missing ticket needs another look
                ticket = run.ticket_step()
            why = run.left_search() or (f"the ticket of step {ticket} is drawn" if settled(run, ticket) else None)
            if new or why:
                m.write_record(ticket)
                m.log_wandb(m.rows[-len(new):] if new else [], ticket)
            if why:
                # The trainer writes a snapshot before it looks for a ticket, and checkpoints before
                # it prunes, so every snapshot up to the ticket's step is on disk by now.
                print(f"monitor: {why}; stopping", file=sys.stderr, flush=True)
                return 0
            time.sleep(a.poll)
    finally:
        m.finish()


if __name__ == "__main__":
    sys.exit(main())
