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
from pipeline.errors import UserError, exit_on_user_error, writing
from pipeline.settings import SearchSettings, check_value, field_of, int_list, json_object


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint and in RUN/pruned/trainer_state.json."""
    step: int = 0          # optimizer steps applied
    consumed: int = 0      # training sequences drawn, all ranks together (the sampler resumes here)
    tokens: int = 0        # non-padding tokens trained on
    elapsed: float = 0.0   # seconds of training, over every launch
    flops: float = 0.0     # model FLOPs trained, all ranks (a checkpoint from before it counts from 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "trainer state") -> "TrainState":
        """Its fields from `d` (a missing one keeps its default); UserError naming `where` when
        one is of the wrong type or negative."""
        check_value(d, dict, where)
        return cls(**{f.name: field_of(d, f.name, float if isinstance(f.default, float) else int, where, low=0)
                      for f in dataclasses.fields(cls) if f.name in d})


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
        self.launches = self.path / "launches.jsonl"  # slurm/pretrain.sh: each launch's wall clock
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
        """The JSON object in `path`, None when there is no file; UserError naming it otherwise."""
        if not path.exists():
            return None
        return json_object(path)

    def read_identity(self) -> dict | None:
        spec = self._read(self.run_json)
        if spec is not None:  # what a launch reads from it; the rest is only compared
            field_of(spec, "model", dict, str(self.run_json))
            field_of(spec, "search", (dict, None), str(self.run_json), default=None)
        return spec

    def write_identity(self, identity: dict) -> None:
        atomic_write_json(self.run_json, identity)

    def fingerprint(self) -> str | None:
        """Names this run in its ticket, so a ticket from another run is refused."""
        if not self.run_json.exists():
            return None
        try:
            return hashlib.sha256(self.run_json.read_bytes()).hexdigest()[:16]
        except OSError as e:
            raise UserError(f"{self.run_json}: cannot be read ({e.strerror or e})") from None

    def searches(self) -> bool | None:
        """Whether the recorded run trains a gated model (None: no run.json yet)."""
        spec = self.read_identity()
        return None if spec is None else bool(spec["model"].get("gates"))

    def read_search(self) -> SearchRecord | None:
        d = self._read(self.search_json)
        if d is None:
            return None
        where = str(self.search_json)
        settings = SearchSettings.from_record(d, where)
        heads, ffn = int_list(d, "heads", where, low=1), int_list(d, "ffn", where, low=1)
        if len(heads) != len(ffn):
            raise UserError(f"{where}: {len(heads)} layers of heads, {len(ffn)} of FFN widths")
        try:
            settings.check_model(heads)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        present = tuple(k for k in settings.to_record() if k in SearchSettings.legacy_names(d))
        return SearchRecord(settings, list(heads), list(ffn), present)

    def write_search(self, record: SearchRecord) -> None:
        atomic_write_json(self.search_json, {**record.settings.to_record(), "heads": record.heads,
                                             "ffn": record.ffn})

    def read_wandb(self) -> dict | None:
        info = self._read(self.wandb_json)
        if info is not None:
            for key in ("id", "project", "group"):
                field_of(info, key, str, str(self.wandb_json))
            for key in ("entity", "mode"):
                field_of(info, key, (str, None), str(self.wandb_json))
        return info

    def write_wandb(self, info: dict) -> None:
        atomic_write_json(self.wandb_json, info)

    def finished_step(self) -> int | None:
        done = self._read(self.finished_json)
        return None if done is None else field_of(done, "step", int, str(self.finished_json), low=0)

    def write_finished(self, step: int) -> None:
        atomic_write_json(self.finished_json, {"step": step})

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_json, summary)

    # -- where the run stands
    def pruned_ready(self) -> bool:
        return self.pruned_state.exists()

    def read_pruned_state(self) -> dict:
        """RUN/pruned/trainer_state.json: the ticket and the TrainState the efficient stage starts from."""
        where = str(self.pruned_state)
        info = self._read(self.pruned_state)
        if info is None:
            raise UserError(f"{where}: missing")
        field_of(info, "state", dict, where)
        field_of(info, "ticket_step", int, where, low=0)
        field_of(info, "reason", str, where)
        for key in ("source", "ticket", "weights"):  # ticket and weights: not in the oldest runs'
            field_of(info, key, (str, None), where, default=None)
        return {**info, "state": TrainState.from_dict(info["state"], f"{where}: field 'state'")}

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
        tag = field_of(info, "tag", str, str(self.latest))
        if tag in ("", ".", "..") or Path(tag).name != tag or "\0" in tag:
            raise UserError(f"{self.latest}: tag {tag!r} is not a checkpoint's name")
        field_of(info, "step", int, str(self.latest), low=0)
        field_of(info, "phase", (str, None), str(self.latest), default=None)
        if not (self.checkpoints / info["tag"]).is_dir():
            raise UserError(f"{self.latest} points at {info['tag']}, which is missing")
        return info

    def ticket_checkpoint(self, step: int) -> tuple[str, int] | None:
        """(tag, step) of the dense checkpoint taken at the ticket of `step` (ticket-N, the newest
        ticket-N.K when the prune was repeated), or None."""
        tags = sorted(p.name for p in self.checkpoints.glob(f"ticket-{step:07d}*") if p.is_dir()
                      and p.name.split(".")[0] == f"ticket-{step:07d}")
        return (tags[-1], step) if tags else None

    def publish_checkpoint(self, tmp_tag: str, tag: str, step: int, keep: int, phase: str) -> str:
        """Rank 0, after every rank has written tmp_tag: make it durable, rename it to a tag no other
        checkpoint has, point latest.json at it, then delete what is no longer needed. The last
        good checkpoint is never deleted before its replacement is in place: a step checkpointed
        again (the step a launch resumed from) gets the tag step-N.K. Returns the tag."""
        src = self.checkpoints / tmp_tag
        if self.metrics.exists():  # the rows up to this step outlive a power loss, as it does
            with open(self.metrics, "rb") as f:
                os.fsync(f.fileno())
        final, k = tag, 0
        while (self.checkpoints / final).exists():
            k += 1
            final = f"{tag}.{k}"
        fsync_tree(src)
        os.replace(src, self.checkpoints / final)
        fsync_dir(self.checkpoints)
        atomic_write_json(self.latest, {"tag": final, "step": step, "phase": phase})
        # The step-N checkpoints rotate; the dense one at the ticket (ticket-N) stays: only a newer
        # ticket-N replaces it (the prune repeated after a kill).
        for prefix, kept in (("step-", keep), ("ticket-", 1)):
            tags = sorted(p.name for p in self.checkpoints.glob(prefix + "*") if p.is_dir())
            for old in tags[:-kept]:  # step-N sorts before step-N.1, which sorts before step-N+1
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
        """(line, row) per logged row. A line that is not JSON is skipped (one cut short by a
        kill); one that is JSON but not a row (an object, its step an integer) is bad input."""
        rows = []
        if not self.metrics.exists():
            return rows
        try:
            data = self.metrics.read_bytes()
        except OSError as e:
            raise UserError(f"{self.metrics}: cannot be read ({e.strerror or e})") from None
        for n, raw in enumerate(data.split(b"\n"), 1):
            try:
                line = raw.decode()
                row = json.loads(line)
            except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                continue  # a line cut short by a kill
            check_value(row, dict, f"{self.metrics}: line {n}")
            field_of(row, "step", int, f"{self.metrics}: line {n}", default=0)
            rows.append((line, row))
        return rows

    def read_launches(self) -> list[dict]:
        """RUN/launches.jsonl's launches ({start, end, stage, rc}, seconds since the epoch) in
        order; a line cut short by a kill, or not a launch, is skipped."""
        out = []
        lines = self.launches.read_text(errors="replace").splitlines() if self.launches.exists() else []
        for line in lines:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict) and all(isinstance(d.get(k), (int, float)) for k in ("start", "end")) \
                    and d["end"] >= d["start"]:
                out.append(d)
        return sorted(out, key=lambda d: d["start"])

    def append_metrics(self, row: dict) -> None:
        # Out of space mid-line: readers skip a torn last line, and a relaunch rewrites the file.
        with writing(self.metrics), open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    # -- stop requests
    def stop_requested(self) -> bool:
        return self.stop_request.exists()

    def clear_stop(self) -> None:
        self.stop_request.unlink(missing_ok=True)

    # -- gate snapshots (trainer -> monitor)
    def write_snapshot(self, step: int, heads: list[np.ndarray], ffn: list[np.ndarray],
                       near_ties: tuple[int, int, float] | None = None) -> Path:
        """RUN/gates/step-NNNNNNN.npz: |gate| per layer (and, for the record, the near-ties of the
        ticket's boundary: heads, FFN neurons, the margin), written to a temporary name and renamed."""
        self.gates.mkdir(parents=True, exist_ok=True)
        path = self.gates / f"step-{step:07d}.npz"
        tmp = self.gates / f".{path.name}.tmp{os.getpid()}"
        arrays = {f"heads_{i}": np.abs(h).astype(np.float32) for i, h in enumerate(heads)}
        arrays.update({f"ffn_{i}": np.abs(f).astype(np.float32) for i, f in enumerate(ffn)})
        if near_ties is not None:
            arrays.update(near_ties_heads=np.int64(near_ties[0]), near_ties_ffn=np.int64(near_ties[1]),
                          tie_margin=np.float64(near_ties[2]))
        with writing(path, partial=[tmp]):
            with open(tmp, "wb") as f:
                np.savez(f, step=np.int64(step), **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(self.gates)  # a checkpoint after this step must not outlive the snapshot
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
    def read_snapshot(path: Path, layers: int, sizes: tuple[list[int], list[int]] | None = None
                      ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """|gate| per layer, heads and FFN, as float64; `sizes`: the model's heads and FFN widths
        per layer, which the snapshot must match."""
        try:
            with np.load(path, allow_pickle=False) as z:  # an object array is refused, never unpickled
                arrays = [z[f"{part}_{i}"] for part in ("heads", "ffn") for i in range(layers)]
        except Exception as e:  # zipfile/format/key errors, .npy instead of .npz: a truncated or foreign file
            raise UserError(f"{path}: not a readable gate snapshot of {layers} layers ({type(e).__name__}: {e})")
        for a in arrays:
            if a.ndim != 1 or a.dtype.kind not in "biuf" or not len(a):
                raise UserError(f"{path}: not a gate snapshot: a {a.ndim}-d array of {a.shape} {a.dtype}, "
                                "expected non-empty 1-d arrays of numbers")
        heads = [a.astype(np.float64) for a in arrays[:layers]]
        ffn = [a.astype(np.float64) for a in arrays[layers:]]
        shape = [len(h) for h in heads], [len(f) for f in ffn]
        if sizes is not None and shape != (list(sizes[0]), list(sizes[1])):
            raise UserError(f"{path}: gate shapes do not match the run's model (heads {shape[0]}, FFN {shape[1]}; "
                            f"the model's {list(sizes[0])}, {list(sizes[1])})")
        if any(not np.isfinite(g).all() for g in heads + ffn):
            raise UserError(f"{path}: the gate snapshot holds NaN or inf")
        return heads, ffn

    # -- the ticket (monitor or trainer -> trainer), written once
    def publish_ticket(self, record: dict) -> dict:
        """Writes RUN/ticket.json unless a ticket is already there (the monitor and the trainer's
        fallback may race); returns the record that is in place."""
        tmp = self.ticket.with_name(f".{self.ticket.name}.tmp{os.getpid()}")
        with writing(self.ticket, partial=[tmp]):
            tmp.write_text(json.dumps(record) + "\n")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.ticket)  # atomic and exclusive: fails if a ticket exists
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            fsync_dir(self.path)
        return json_object(self.ticket)

    def put_ticket(self, record: dict) -> None:
        """The trainer's ticket: kept if RUN/ticket.json already holds the same one (the monitor,
        applying the same rule to the same snapshot, may have written it first); otherwise it
        replaces what is there (a ticket from a monitor run with other settings), atomically."""
        try:
            there = json_object(self.ticket) if self.ticket.exists() else {}
        except UserError:
            there = {}  # unreadable: replaced
        if [there.get(k) for k in ("step", "heads", "ffn")] == [record[k] for k in ("step", "heads", "ffn")]:
            return
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
            return field_of(json_object(self.ticket), "step", int, str(self.ticket), low=0)
        except UserError:
            return None

    def read_ticket(self, heads: list[int], ffn: list[int]) -> dict:
        """Loads and checks the ticket against this run (fingerprint) and the model's shape."""
        path, run = self.ticket, self.fingerprint()
        where = f"{path}: not a valid ticket"
        t = json_object(path, where)
        step, reason = field_of(t, "step", int, where, low=0), field_of(t, "reason", str, where)
        owner = field_of(t, "run", (str, None), where)
        field_of(t, "source", (str, None), where, default=None)  # kept in RUN/pruned/trainer_state.json
        masks = {}
        for part in ("heads", "ffn"):
            layers = field_of(t, part, list, where)
            for i, mask in enumerate(layers):
                check_value(mask, list, f"{where}: {part} of layer {i}")
                if not all(type(x) in (int, bool) and x in (0, 1) for x in mask):
                    raise UserError(f"{where}: {part} of layer {i} is not a list of 0 and 1")
            masks[part] = [np.array(m, dtype=bool) for m in layers]
        masks_h, masks_f = masks["heads"], masks["ffn"]
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
