"""The run directory (RUN): the single source of truth for where a run stands. Every name in RUN
is here, with its typed read and write; nothing else spells a path inside RUN.

RUN/run.json            what the run is (model config, data, batch, seed): a restart with
                        something else is refused
RUN/search.json         the searching stage's settings (pipeline.settings.SearchSettings) and the
                        dense model's heads and FFN widths; the monitor reads it
RUN/wandb.json          the W&B run (id, project, group), so a relaunched or resumed run continues
                        the same W&B run and the monitor joins its group
RUN/metrics.jsonl       one JSON object per logged step (and per validation)
RUN/checkpoints/        DeepSpeed checkpoints step-NNNNNNN/, and latest.json pointing at the last
                        complete one (a checkpoint is written as tmp-step-NNNNNNN/ and renamed)
RUN/init.safetensors    the weights before the search (--ticket_weights rewind only)
RUN/gates/              gate snapshots step-NNNNNNN.npz (|gate| per layer), from rank 0
RUN/earlybird/          the monitor's record: distances.jsonl and PNG plots
RUN/ticket.json         the drawn ticket (monitor or the trainer's fallback), written once
RUN/pruned/             the reduced model (Hugging Face format) and trainer_state.json: where
                        the efficient stage starts
RUN/final/              the model and tokenizer in Hugging Face format
RUN/stop                a stop request (slurm/pretrain.sh writes it on Slurm's warning signal): the
                        trainer checkpoints at the next step boundary, removes it and exits 75
RUN/finished.json       written last: the run is done
RUN/summary.json        what the run did (python -m pipeline.summary)

    python -m pipeline.run_dir --stage RUN    prints new, search, efficient or done
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.files import atomic_write_bytes, atomic_write_json, fsync_dir, fsync_tree
from pipeline.errors import UserError, exit_on_user_error
from pipeline.settings import SearchSettings


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint and in RUN/pruned/trainer_state.json."""
    step: int = 0          # optimizer steps applied
    consumed: int = 0      # training sequences drawn, all ranks together (the sampler resumes here)
    tokens: int = 0        # non-padding tokens trained on
    elapsed: float = 0.0   # seconds of training, over every launch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class SearchRecord:
    """RUN/search.json: the search's settings and the dense model's shape the masks are drawn on."""
    settings: SearchSettings
    heads: list[int]
    ffn: list[int]
    present: tuple[str, ...] = ()  # the settings the file held (an older one lacks some)


class RunDir:
    STAGES = ("new", "search", "efficient", "done")

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.run_json = self.path / "run.json"
        self.search_json = self.path / "search.json"
        self.wandb_json = self.path / "wandb.json"
        self.finished_json = self.path / "finished.json"
        self.summary_json = self.path / "summary.json"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.latest = self.checkpoints / "latest.json"
        self.init_weights = self.path / "init.safetensors"
        self.gates = self.path / "gates"
        self.earlybird = self.path / "earlybird"
        self.ticket = self.path / "ticket.json"
        self.pruned = self.path / "pruned"
        self.pruned_state = self.pruned / "trainer_state.json"
        self.final = self.path / "final"
        self.stop_request = self.path / "stop"

    # -- JSON files
    def _read(self, path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON ({e})")

    def read_identity(self) -> dict | None:
        return self._read(self.run_json)

    def write_identity(self, identity: dict) -> None:
        atomic_write_json(self.run_json, identity)

    def fingerprint(self) -> str | None:
        """Names this run in its ticket, so a ticket from another run is refused."""
        if not self.run_json.exists():
            return None
        return hashlib.sha256(self.run_json.read_bytes()).hexdigest()[:16]

    def searches(self) -> bool | None:
        """Whether the recorded run trains a gated model (None: no run.json yet)."""
        spec = self.read_identity()
        return None if spec is None else bool(spec["model"].get("gates"))

    def read_search(self) -> SearchRecord | None:
        d = self._read(self.search_json)
        if d is None:
            return None
        settings = SearchSettings.from_record(d, str(self.search_json))
        present = tuple(k for k in settings.to_record() if k in SearchSettings.legacy_names(d))
        return SearchRecord(settings, list(d["heads"]), list(d["ffn"]), present)

    def write_search(self, record: SearchRecord) -> None:
        atomic_write_json(self.search_json, {**record.settings.to_record(), "heads": record.heads,
                                             "ffn": record.ffn})

    def read_wandb(self) -> dict | None:
        return self._read(self.wandb_json)

    def write_wandb(self, info: dict) -> None:
        atomic_write_json(self.wandb_json, info)

    def finished_step(self) -> int | None:
        done = self._read(self.finished_json)
        return done["step"] if done else None

    def write_finished(self, step: int) -> None:
        atomic_write_json(self.finished_json, {"step": step})

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_json, summary)

    # -- where the run stands
    def pruned_ready(self) -> bool:
        return self.pruned_state.exists()

    def read_pruned_state(self) -> dict:
        """RUN/pruned/trainer_state.json: the ticket and the TrainState the efficient stage starts from."""
        info = self._read(self.pruned_state)
        return {**info, "state": TrainState.from_dict(info["state"])}

    def stage(self) -> str:
        """The launch that comes next: new (nothing yet), search (the first stage goes on: the
        search, or dense training with --earlybird off), efficient (on RUN/pruned/) or done."""
        if self.finished_json.exists():
            return "done"
        if self.pruned_ready():
            return "efficient"
        return "search" if self.run_json.exists() else "new"

    def left_search(self) -> str | None:
        """Why there is no search to watch any more, or None while one may go on."""
        if self.finished_json.exists():
            return "the run is finished"
        if self.pruned_ready():
            return "the pruned model is written"
        if self.searches() is False:
            return "the run does not search (--earlybird off)"
        return None

    # -- checkpoints
    def latest_checkpoint(self) -> dict | None:
        info = self._read(self.latest)
        if info is None:
            return None
        if not (self.checkpoints / info["tag"]).is_dir():
            raise UserError(f"{self.latest} points at {info['tag']}, which is missing")
        return info

    def publish_checkpoint(self, tmp_tag: str, tag: str, step: int, keep: int, phase: str) -> str:
        """Rank 0, after every rank has written tmp_tag: make it durable, rename it to a tag no other
        checkpoint has, point latest.json at it, then delete what is no longer needed. The last
        good checkpoint is never deleted before its replacement is in place: a step checkpointed
        again (the step a launch resumed from) gets the tag step-N.K. Returns the tag."""
        src = self.checkpoints / tmp_tag
        final, k = tag, 0
        while (self.checkpoints / final).exists():
            k += 1
            final = f"{tag}.{k}"
        fsync_tree(src)
        os.replace(src, self.checkpoints / final)
        fsync_dir(self.checkpoints)
        atomic_write_json(self.latest, {"tag": final, "step": step, "phase": phase})
        tags = sorted(p.name for p in self.checkpoints.glob("step-*") if p.is_dir())
        for old in tags[:-keep]:  # step-N sorts before step-N.1, which sorts before step-N+1
            if old != final:
                shutil.rmtree(self.checkpoints / old, ignore_errors=True)
        for stale in self.checkpoints.glob("tmp-*"):  # a checkpoint a killed run never finished
            if stale.name != tmp_tag:
                shutil.rmtree(stale, ignore_errors=True)
        return final

    # -- metrics
    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after `step` (a run killed after its last checkpoint logged them,
        and they are trained again)."""
        if not self.metrics.exists():
            return
        keep = [line + "\n" for line, row in self._metric_lines() if row.get("step", 0) <= step]
        atomic_write_bytes(self.metrics, "".join(keep).encode())

    def read_metrics(self) -> list[dict]:
        return [row for _, row in self._metric_lines()]

    def _metric_lines(self) -> list[tuple[str, dict]]:
        rows = []
        if self.metrics.exists():
            for line in self.metrics.read_text().splitlines():
                try:
                    rows.append((line, json.loads(line)))
                except ValueError:
                    continue  # a line cut short by a kill
        return rows

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    # -- stop requests
    def stop_requested(self) -> bool:
        return self.stop_request.exists()

    def clear_stop(self) -> None:
        self.stop_request.unlink(missing_ok=True)

    # -- gate snapshots (trainer -> monitor)
    def write_snapshot(self, step: int, heads: list[np.ndarray], ffn: list[np.ndarray]) -> Path:
        """RUN/gates/step-NNNNNNN.npz: |gate| per layer, written to a temporary name and renamed."""
        self.gates.mkdir(parents=True, exist_ok=True)
        path = self.gates / f"step-{step:07d}.npz"
        tmp = self.gates / f".{path.name}.tmp{os.getpid()}"
        arrays = {f"heads_{i}": np.abs(h).astype(np.float32) for i, h in enumerate(heads)}
        arrays.update({f"ffn_{i}": np.abs(f).astype(np.float32) for i, f in enumerate(ffn)})
        with open(tmp, "wb") as f:
            np.savez(f, step=np.int64(step), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def snapshot_paths(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.gates.glob("step-*.npz"):
            try:
                found.append((int(p.stem.split("-")[1]), p))
            except ValueError:
                continue
        return sorted(found)

    @staticmethod
    def read_snapshot(path: Path, layers: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        try:
            with np.load(path) as z:
                heads = [z[f"heads_{i}"].astype(np.float64) for i in range(layers)]
                ffn = [z[f"ffn_{i}"].astype(np.float64) for i in range(layers)]
        except Exception as e:  # zipfile/pickle/key errors: a truncated or foreign file
            raise UserError(f"{path}: not a readable gate snapshot of {layers} layers ({type(e).__name__}: {e})")
        if any(not np.isfinite(g).all() for g in heads + ffn):
            raise UserError(f"{path}: the gate snapshot holds NaN or inf")
        return heads, ffn

    # -- the ticket (monitor or trainer -> trainer), written once
    def publish_ticket(self, record: dict) -> dict:
        """Writes RUN/ticket.json unless a ticket is already there (the monitor and the trainer's
        fallback may race); returns the record that is in place."""
        tmp = self.ticket.with_name(f".{self.ticket.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.ticket)  # atomic and exclusive: fails if a ticket exists
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return json.loads(self.ticket.read_text())

    def put_ticket(self, record: dict) -> None:
        """The trainer's ticket: kept if RUN/ticket.json already holds the same one (the monitor,
        applying the same rule to the same snapshot, may have written it first); otherwise it
        replaces what is there (a ticket from a monitor run with other settings), atomically."""
        try:
            there = json.loads(self.ticket.read_text())
            if [there.get(k) for k in ("step", "heads", "ffn")] == [record[k] for k in ("step", "heads", "ffn")]:
                return
        except (OSError, ValueError):
            pass
        atomic_write_bytes(self.ticket, (json.dumps(record) + "\n").encode())

    def discard_after(self, step: int) -> None:
        """On resuming at `step`: the gate snapshots and the ticket of later steps belong to a
        trajectory the resume discards (the same steps will be trained again)."""
        for s, path in self.snapshot_paths():
            if s > step:
                path.unlink(missing_ok=True)
        found = self.ticket_step()
        if found is not None and found > step:
            self.ticket.unlink(missing_ok=True)
        fsync_dir(self.path)

    def ticket_step(self) -> int | None:
        """The ticket's step, or None when there is none or it cannot be read (the trainer reports
        a broken ticket; the monitor only marks the step)."""
        try:
            return int(json.loads(self.ticket.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def read_ticket(self, heads: list[int], ffn: list[int]) -> dict:
        """Loads and checks the ticket against this run (fingerprint) and the model's shape."""
        path, run = self.ticket, self.fingerprint()
        try:
            t = json.loads(path.read_text())
            masks_h = [np.asarray(h, dtype=int).astype(bool) for h in t["heads"]]
            masks_f = [np.asarray(f, dtype=int).astype(bool) for f in t["ffn"]]
            step, reason, owner = int(t["step"]), str(t["reason"]), t["run"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a valid ticket ({type(e).__name__}: {e})")
        if owner != run:
            raise UserError(f"{path}: the ticket belongs to another run ({owner}, this run is {run})")
        if [len(h) for h in masks_h] != list(heads) or [len(f) for f in masks_f] != list(ffn):
            raise UserError(f"{path}: the ticket's layers do not match the model "
                            f"({len(masks_h)} layers, the model {len(heads)})")
        for i, (h, f) in enumerate(zip(masks_h, masks_f)):
            if not h.any() or not f.any():
                raise UserError(f"{path}: the ticket prunes every {'head' if not h.any() else 'FFN neuron'} "
                                f"of layer {i}")
        return {**t, "step": step, "reason": reason, "heads": masks_h, "ffn": masks_f}


def ticket_record(step: int, reason: str, source: str, run: str, heads: list[np.ndarray],
                  ffn: list[np.ndarray], distances: list[dict]) -> dict:
    """RUN/ticket.json's content: where and why it was drawn, by whom, for which run, the masks."""
    return {"step": step, "reason": reason, "source": source, "run": run,
            "kept_heads": [int(h.sum()) for h in heads], "ffn_width": [int(f.sum()) for f in ffn],
            "heads": [h.astype(int).tolist() for h in heads], "ffn": [f.astype(int).tolist() for f in ffn],
            "distances": distances}


@exit_on_user_error
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Where a run stands (see the module's docstring).")
    p.add_argument("--stage", required=True, type=Path, metavar="RUN",
                   help="print the launch that comes next: " + ", ".join(RunDir.STAGES))
    a = p.parse_args(argv)
    print(RunDir(a.stage).stage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
