"""The run directory (RUN): the single source of truth for where a run stands.

RUN/run.json            what the run is (model config, data, DeepSpeed config): a restart with
                        something else is refused
RUN/metrics.jsonl       one JSON object per logged step (and per validation)
RUN/checkpoints/        DeepSpeed checkpoints step-NNNNNNN/, and latest.json pointing at the last
                        complete one (a checkpoint is written as tmp-step-NNNNNNN/ and renamed)
RUN/wandb.json          the W&B run (id, project, group), so a relaunched or resumed run continues
                        the same W&B run and the monitor joins its group
RUN/search.json         the searching stage's settings (snapshot interval, pruning amounts, rule)
RUN/gates/              gate snapshots step-NNNNNNN.npz (|gate| per layer), from rank 0
RUN/earlybird/          the monitor's record: distances.jsonl and PNG plots
RUN/ticket.json         the drawn ticket (monitor or the trainer's fallback), written once
RUN/init.safetensors    the weights before the search (--ticket_weights rewind only)
RUN/pruned/             the reduced model (Hugging Face format) and trainer_state.json: where
                        the efficient stage starts
RUN/final/              the model and tokenizer in Hugging Face format
RUN/stop                a stop request (slurm/pretrain.sh writes it on Slurm's warning signal): the
                        trainer checkpoints at the next step boundary, removes it and exits 75
RUN/finished.json       written last: the run is done
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from data_prep.files import atomic_write_bytes, atomic_write_json


class RunDir:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"
        self.final = self.path / "final"
        self.gates = self.path / "gates"
        self.earlybird = self.path / "earlybird"
        self.ticket = self.path / "ticket.json"
        self.pruned = self.path / "pruned"
        self.stop_request = self.path / "stop"

    def fingerprint(self) -> str | None:
        """Names this run in its ticket, so a ticket from another run is refused."""
        p = self.path / "run.json"
        if not p.exists():
            return None
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16]

    def pruned_ready(self) -> bool:
        return (self.pruned / "trainer_state.json").exists()

    def read_json(self, name: str) -> dict | None:
        p = self.path / name
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except ValueError as e:
            raise SystemExit(f"error: {p}: not valid JSON ({e})")

    def finished_step(self) -> int | None:
        done = self.read_json("finished.json")
        return done["step"] if done else None

    def latest_checkpoint(self) -> dict | None:
        latest = self.checkpoints / "latest.json"
        if not latest.exists():
            return None
        info = json.loads(latest.read_text())
        if not (self.checkpoints / info["tag"]).is_dir():
            raise SystemExit(f"error: {latest} points at {info['tag']}, which is missing")
        return info

    def publish_checkpoint(self, tmp_tag: str, tag: str, step: int, keep: int, phase: str) -> None:
        """Rank 0, after every rank has written tmp_tag: rename, point latest at it, prune."""
        src, dst = self.checkpoints / tmp_tag, self.checkpoints / tag
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(src, dst)
        atomic_write_json(self.checkpoints / "latest.json", {"tag": tag, "step": step, "phase": phase})
        tags = sorted(p.name for p in self.checkpoints.glob("step-*"))
        for old in tags[:-keep]:
            shutil.rmtree(self.checkpoints / old, ignore_errors=True)
        for stale in self.checkpoints.glob("tmp-*"):  # a checkpoint a killed run never finished
            if stale.name != tmp_tag:
                shutil.rmtree(stale, ignore_errors=True)

    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after `step` (a run killed after its last checkpoint logged them,
        and they are trained again)."""
        if not self.metrics.exists():
            return
        keep = []
        for line in self.metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if row.get("step", 0) <= step:
                keep.append(line + "\n")
        atomic_write_bytes(self.metrics, "".join(keep).encode())

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
