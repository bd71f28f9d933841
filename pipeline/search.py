"""The EarlyBERT searching stage, trainer side, as one object the loop calls at step boundaries:
gate snapshots for the monitor, the initial weights kept for rewinding, the early-bird rule on
each snapshot (the monitor applies the same rule to the same files, so either may write
RUN/ticket.json first and both write the same ticket), the fallback at --search_max_steps, and
pruning into RUN/pruned/. The ticket is taken at the step of the snapshot that gave it: what is
pruned depends on the snapshots alone, never on how fast the monitor runs or whether it runs.

    search.begin(step)              after resuming: the rule's history, rewind weights, search.json
    search.after_step(step)         a gate snapshot every --snapshot_every steps and the rule on it
    search.ticket(step)             the ticket every rank agrees on, or None
    search.prune(state, ticket)     RUN/pruned/ (reduced model + trainer_state.json)

Every method is a collective (ZeRO partitions are gathered): all ranks call it. Fine-tuning with
gates calls the same object.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.dist import Comm
from pipeline.earlybird import EarlyBirdRule, draw_masks, random_masks
from pipeline.engine import full_weights, gate_values
from pipeline.errors import UserError, writing
from pipeline.hf import export
from pipeline.model import TIED_DECODER, BertForMLM
from pipeline.prune import prune_state_dict, pruned_config
from pipeline.run_dir import RunDir, SearchRecord, TrainState, ticket_record
from pipeline.settings import SearchSettings


class Search:
    def __init__(self, engine, run: RunDir, comm: Comm, rank: int, settings: SearchSettings, seed: int,
                 tokenizer_dir: Path, log: Callable[[str], None]):
        self.engine, self.run, self.comm, self.rank = engine, run, comm, rank
        self.s, self.seed, self.tokenizer_dir, self.log = settings, seed, tokenizer_dir, log
        # The early-bird rule, applied by rank 0 to every snapshot as it is written (the monitor
        # applies the same rule to the same files; the fallback is ticket(), not the rule's).
        self.rule = EarlyBirdRule.for_search(settings)
        self.fired_at: int | None = None  # rank 0: the step whose snapshot gave the ticket

    def begin(self, step: int) -> None:
        """At a launch's start, resuming at `step`: drops the snapshots and a ticket of a trajectory
        the resume discards (newer than `step`), rebuilds the rule's history from the snapshots
        kept, checks a ticket already in RUN; keeps the starting weights (RUN/init.safetensors, for
        --ticket_weights rewind and for a rewound branch of pipeline.experiment); then writes
        RUN/search.json (last: the monitor starts watching when it appears)."""
        config = self.engine.module.config
        error = None
        if self.rank == 0:
            try:  # a ticket in RUN is checked before anything is touched
                found = self.run.read_ticket(config.heads, config.ffn) if self.run.ticket.exists() else None
                self.fired_at = found["step"] if found is not None and found["step"] == step else None
                self.run.discard_after(step)
                for s, path in self.run.snapshot_paths():
                    self._replay(s, path)
            except UserError as e:  # reported by every rank, not only this one
                error = str(e)
        error = self.comm.broadcast(error)
        if error is not None:
            raise UserError(error + "; remove it to let the search go on")
        if step == 0:  # kept whatever --ticket_weights: a rewound ticket may be drawn until the prune
            self._save_initial_weights()
        if self.rank == 0:
            self.run.write_search(SearchRecord(self.s, list(config.heads), list(config.ffn)))

    def after_step(self, step: int) -> bool:
        """Every --snapshot_every steps: the gate snapshot, and the rule's verdict on it (rank 0
        publishes the ticket when it fires). Returns, on every rank, whether the ticket is due now."""
        if step % self.s.snapshot_every != 0:
            return False
        gates = gate_values(self.engine)
        fired = False
        if self.rank == 0:
            # The snapshot's float32 |gate| values, exactly what a resumed rule and the monitor read
            # back from it; the snapshot is on disk before its ticket is.
            gates = tuple([np.abs(g).astype(np.float32).astype(np.float64) for g in part] for part in gates)
            reason, d = self._apply(step, gates)
            self.run.write_snapshot(step, *gates, near_ties=(*d["near_ties"], self.s.tie_margin))
            if reason is not None:
                self.run.put_ticket(ticket_record(step, reason, "trainer", self.run.fingerprint(),
                                                  *self._last_masks(), []))
                self.fired_at, fired = step, True
        return self.comm.agree(fired)

    def ticket(self, step: int) -> dict | None:
        """At a step boundary: the ticket all ranks agree on, or None. The rule's ticket is taken at
        the step of the snapshot it came from; at --search_max_steps without one the trainer draws
        it from its own gates. A ticket.json of another step (a monitor run with other settings)
        does not decide: the ticket and its step depend on the snapshots alone."""
        config = self.engine.module.config
        due = self.comm.agree(self.rank == 0 and self.fired_at == step)
        fallback = not due and step >= self.s.search_max_steps
        if not due and not fallback:
            return None
        gates = gate_values(self.engine) if fallback else None
        box = [None]
        if self.rank == 0:
            try:
                if fallback:
                    heads, ffn = draw_masks(*gates, self.s.prune_heads, self.s.prune_ffn,
                                            ffn_multiple=self.s.ffn_multiple)
                    reason = (f"fallback: no early-bird ticket by the maximum search length "
                              f"(--search_max_steps {self.s.search_max_steps}); drawn by the trainer from "
                              f"its own gates at step {step}")
                    self.run.put_ticket(ticket_record(step, reason, "trainer", self.run.fingerprint(), heads,
                                                      ffn, []))
                box[0] = self.run.read_ticket(config.heads, config.ffn)
            except UserError as e:
                box[0] = str(e)
        found = self.comm.broadcast(box[0])
        if isinstance(found, str):
            raise UserError(found + "; remove it to let the search go on")
        return found

    def _replay(self, step: int, path: Path) -> None:
        """Rank 0, resuming: the rule on snapshot `path` as written (the values the monitor
        reads), added to the history."""
        config = self.engine.module.config
        self._apply(step, self.run.read_snapshot(path, config.num_layers, (config.heads, config.ffn)))

    def _apply(self, step: int, gates: tuple[list, list]) -> tuple[str | None, dict]:
        """Rank 0: the masks drawn from |gate| values and the rule's verdict on them."""
        heads, ffn = draw_masks(*gates, self.s.prune_heads, self.s.prune_ffn, self.s.ffn_multiple)
        return self.rule.update(step, heads, ffn, gates)

    def _last_masks(self) -> tuple[list, list]:
        _, heads, ffn = self.rule.history[-1]
        return heads, ffn

    def prune(self, state: TrainState, ticket: dict, metrics_summary: Callable[..., None]) -> None:
        """RUN/pruned/: the reduced model (--ticket random|rule, --ticket_weights carry|rewind) and
        trainer_state.json (the ticket and where the efficient stage continues)."""
        s, run = self.s, self.run
        full = full_weights(self.engine) if s.ticket_weights == "carry" else None  # rewind reads init
        heads, ffn = ticket["heads"], ticket["ffn"]
        if s.ticket == "random":
            heads, ffn = random_masks(heads, self.seed), random_masks(ffn, self.seed + 1)
        if self.rank == 0:
            dense = self.engine.module.config
            if s.ticket_weights == "rewind":
                weights = prune_state_dict(load_file(str(run.init_weights)), dense, heads, ffn, fold_gates=False)
            else:
                weights = prune_state_dict(full, dense, heads, ffn)
            with torch.device("meta"):
                small = BertForMLM(pruned_config(dense, heads, ffn))
            info = {"state": state.to_dict(), "ticket_step": ticket["step"], "reason": ticket["reason"],
                    "source": ticket.get("source"), "ticket": s.ticket, "weights": s.ticket_weights,
                    "dense": {"heads": dense.heads, "ffn": dense.ffn},
                    "heads": [h.astype(int).tolist() for h in heads], "ffn": [f.astype(int).tolist() for f in ffn]}
            export(small, run.pruned, self.tokenizer_dir, weights, extra={run.pruned_state.name: info})
            metrics_summary(ticket_step=ticket["step"], ticket_taken_at=state.step)
            self.log(f"ticket of step {ticket['step']} ({ticket['reason']}); {s.ticket} ticket, "
                     f"{s.ticket_weights} weights: heads {small.config.heads}, FFN {small.config.ffn}")
        self.comm.barrier()

    def _save_initial_weights(self) -> None:
        """The weights before the search (gates all 1), for a rewound ticket."""
        full = full_weights(self.engine)
        path = self.run.init_weights
        if self.rank == 0 and not path.exists():
            full.pop(TIED_DECODER, None)  # tied to the word embeddings
            tmp = path.with_name(f".{path.name}.tmp")
            with writing(path, partial=[tmp]):  # out of space: exit 74, no partial file left
                save_file(full, str(tmp))
                tmp.replace(path)
        self.comm.barrier()
