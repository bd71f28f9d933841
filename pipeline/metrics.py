"""The trainer's metrics: one row per logged step or validation, to RUN/metrics.jsonl, W&B and stderr
(rank 0 only). W&B joins the run recorded in RUN/wandb.json, so a relaunch continues the same W&B
run and the monitor's run joins its group."""
from __future__ import annotations

import os
import secrets
import sys
import time

from pipeline.run_dir import RunDir
from pipeline.settings import SearchSettings, TrainSettings


class Metrics:
    def __init__(self, run: RunDir, rank: int):
        self.run, self.rank, self.wandb = run, rank, None

    def start_wandb(self, s: TrainSettings, search: SearchSettings, identity: dict) -> None:
        config = {**vars(s), **search.to_record(), **identity, "deepspeed_config": str(s.deepspeed_config)}
        self.start(s.wandb_project, s.wandb_entity, s.wandb_group, s.wandb_mode, config, "train", "earlybert")

    def start(self, project: str | None, entity: str | None, group: str | None, mode: str | None, config: dict,
              job_type: str, group_prefix: str) -> None:
        """Joins (or starts) the W&B run recorded in RUN/wandb.json; nothing without a project,
        on ranks other than 0, or in mode disabled."""
        if self.rank != 0 or project is None or (mode or os.environ.get("WANDB_MODE")) == "disabled":
            return
        import wandb  # optional at run time: only a run that logs to W&B needs it
        info = self.run.read_wandb()
        if info is None:
            run_id = secrets.token_hex(6)
            # The monitor joins the trainer's group (the run id when none is given).
            info = {"id": run_id, "project": project, "entity": entity,
                    "group": group or f"{group_prefix}-{run_id}", "mode": mode}
            self.run.write_wandb(info)
        self.wandb = wandb.init(project=info["project"], group=info["group"], entity=info["entity"],
                                mode=mode, id=info["id"], resume="allow", dir=str(self.run.path),
                                job_type=job_type, config=config)

    def log(self, row: dict) -> None:
        """Rank 0: the row, stamped with the wall clock ("time", seconds since the epoch: what
        pipeline.experiment places on the launches of RUN/launches.jsonl)."""
        if self.rank != 0:
            return
        row = {**row, "time": round(time.time(), 3)}
        self.run.append_metrics(row)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if "loss" in row and "mfu" in row:
            print(f"step {row['step']:>6}  {row['phase']:<9}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                  f"{row.get('tokens_per_s', 0):,.0f} tok/s  mfu {row.get('mfu', 0):.1%}",
                  file=sys.stderr, flush=True)

    def summary(self, **values) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
