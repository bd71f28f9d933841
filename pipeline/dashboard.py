"""Saves a W&B workspace view for EarlyBERT runs: `python -m pipeline.dashboard --entity E --project P`.

Sections: training (loss, LR, throughput, validation), the early-bird search (distance to the
previous mask, the window's largest distance, kept heads and FFN width per layer, gate
histograms) and the monitor's pairwise step x step mask-distance heat maps and ticket shape.
The keys are those pipeline/train.py and pipeline/monitor.py log. --dry_run prints the view as
JSON and saves nothing (no network needed).
"""
from __future__ import annotations

import argparse
import json
import sys

TRAINING = [("loss", ["loss"]), ("learning rate", ["lr", "gate_lr"]), ("throughput (tokens/s)", ["tokens_per_s"]),
            ("validation loss", ["val_loss"]), ("validation accuracy", ["val_accuracy"]),
            ("step time (s)", ["step_time_s"]), ("sum of |gate|", ["gate_l1"]), ("MFU", ["mfu"])]
SEARCH = [("distance to the previous mask", ["earlybird/heads_to_previous", "earlybird/ffn_to_previous"]),
          ("largest distance in the window", ["earlybird/heads_window_max", "earlybird/ffn_window_max"])]
PER_LAYER = [("kept heads per layer", "earlybird/kept_heads/layer_.*"),
             ("FFN width per layer", "earlybird/ffn_width/layer_.*")]
MEDIA = [("pairwise head mask distance", "earlybird/pairwise_heads"),
         ("pairwise FFN mask distance", "earlybird/pairwise_ffn"),
         ("distance to the previous mask (monitor)", "earlybird/distance_to_previous"),
         ("ticket shape", "earlybird/ticket_shape")]
HISTOGRAMS = ["earlybird/head_gates", "earlybird/ffn_gates"]


def build(entity: str, project: str, name: str):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    training = [wr.LinePlot(title=t, y=y) for t, y in TRAINING]
    search = [wr.LinePlot(title=t, y=y) for t, y in SEARCH]
    search += [wr.LinePlot(title=t, metric_regex=rx) for t, rx in PER_LAYER]
    search += [wr.MediaBrowser(title=f"histogram {k}", media_keys=[k]) for k in HISTOGRAMS]
    maps = [wr.MediaBrowser(title=t, media_keys=[k], mode="gallery", gallery_axis="step") for t, k in MEDIA]
    return ws.Workspace(entity=entity, project=project, name=name, sections=[
        ws.Section(name="Training", panels=training, is_open=True),
        ws.Section(name="Early-bird search", panels=search, is_open=True),
        ws.Section(name="Ticket convergence (pairwise mask distances)", panels=maps, is_open=True)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entity", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--name", default="EarlyBERT")
    p.add_argument("--dry_run", action="store_true", help="print the view as JSON, save nothing")
    a = p.parse_args(argv)
    workspace = build(a.entity, a.project, a.name)
    if a.dry_run:
        print(json.dumps(workspace._to_model().model_dump(mode="json"), indent=1))
        return 0
    workspace.save()
    print(workspace.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
