"""What a run did, from RUN alone: `python -m pipeline.summary --run_dir RUN`.

Prints the ticket (step, reason, kept heads per layer, FFN widths), parameters before and after
pruning, the median step time of each phase and the final validation loss, and writes the same
as RUN/summary.json. slurm/pretrain.sh ends with it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.errors import UserError, exit_on_user_error
from pipeline.model import BertConfig, BertForMLM
from pipeline.run_dir import RunDir


def parameters(config: BertConfig) -> int:
    with torch.device("meta"):
        return BertForMLM(replace(config, gates=False)).num_parameters()


def summarise(run: RunDir) -> dict:
    spec = run.read_identity()
    if spec is None:
        raise UserError(f"{run.path}: no run.json (has the trainer started?)")
    dense = BertConfig.from_dict(spec["model"], f"{run.run_json}: field 'model'")
    rows = run.read_metrics()
    out = {"run_dir": str(run.path), "finished": run.finished_step(),
           "parameters_dense": parameters(dense), "heads_dense": dense.heads, "ffn_dense": dense.ffn}
    if run.pruned_ready():
        info = run.read_pruned_state()
        small = BertConfig.from_json(run.pruned / "config.json")
        out.update(ticket_step=info["ticket_step"], ticket_taken_at=info["state"].step,
                   ticket_reason=info["reason"], ticket=info["ticket"], ticket_weights=info["weights"],
                   kept_heads=small.heads, ffn_width=small.ffn, parameters_pruned=parameters(small))
    times = {}
    for r in rows:
        if "step_time_s" in r and not r.get("nonfinite"):
            times.setdefault(r["phase"], []).append(r["step_time_s"])
    # The first steps of each launch pay for warm-up; the median ignores them.
    out["median_step_time_s"] = {p: statistics.median(t) for p, t in times.items()}
    vals = [r for r in rows if "val_loss" in r]
    if vals:
        out.update(final_val_loss=vals[-1]["val_loss"], final_val_accuracy=vals[-1]["val_accuracy"],
                   final_val_step=vals[-1]["step"])
    return out


def render(s: dict) -> str:
    lines = [f"EarlyBERT run summary: {s['run_dir']}"]
    if "ticket_step" in s:
        lines += [f"  ticket:           step {s['ticket_step']} (taken at step {s['ticket_taken_at']}; "
                  f"{s['ticket']} ticket, {s['ticket_weights']} weights)",
                  f"  reason:           {s['ticket_reason']}",
                  f"  heads per layer:  {s['kept_heads']} (dense {s['heads_dense']})",
                  f"  FFN widths:       {s['ffn_width']} (dense {s['ffn_dense']})",
                  f"  parameters:       {s['parameters_dense']:,} -> {s['parameters_pruned']:,} "
                  f"({1 - s['parameters_pruned'] / s['parameters_dense']:.1%} fewer)"]
    else:
        lines += ["  ticket:           none (dense training, or the search has not ended)",
                  f"  parameters:       {s['parameters_dense']:,}"]
    t = s["median_step_time_s"]
    steps = ", ".join(f"{p} {v:.3f} s" for p, v in t.items())
    if "search" in t and "efficient" in t:
        steps += f" (efficient / search = {t['efficient'] / t['search']:.2f})"
    lines.append(f"  median step time: {steps or 'no steps logged'}")
    if "final_val_loss" in s:
        lines.append(f"  validation:       loss {s['final_val_loss']:.4f}, accuracy "
                     f"{s['final_val_accuracy']:.4f} at step {s['final_val_step']}")
    lines.append(f"  finished:         {'step ' + str(s['finished']) if s['finished'] else 'no'}")
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run_dir", required=True, type=Path)
    a = p.parse_args(argv)
    run = RunDir(a.run_dir)
    s = summarise(run)
    run.write_summary(s)
    print(render(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
