"""The EarlyBERT searching stage, trainer side, as one object the loop calls at step boundaries:
gate snapshots for the monitor, the initial weights kept for rewinding, the ticket (the monitor's
RUN/ticket.json, or drawn here at --search_max_steps), and pruning into RUN/pruned/.

    search.begin(step)              after resuming: rewind weights at step 0, RUN/search.json
    search.after_step(step)         a gate snapshot every --snapshot_every steps
    search.ticket(step)             the ticket every rank agrees on, or None
    search.prune(state, ticket)     RUN/pruned/ (reduced model + trainer_state.json)

Every method is a collective (ZeRO partitions are gathered): all ranks call it. Fine-tuning with
gates calls the same object.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from pipeline.dist import Comm
from pipeline.earlybird import draw_masks, random_masks
from pipeline.engine import full_weights, gate_values
from pipeline.errors import UserError
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

    def begin(self, step: int) -> None:
        """Keeps the starting weights for --ticket_weights rewind, then writes RUN/search.json
        (last: the monitor starts watching when it appears)."""
        if self.s.ticket_weights == "rewind" and step == 0:
            self._save_initial_weights()
        config = self.engine.module.config
        if self.rank == 0:
            self.run.write_search(SearchRecord(self.s, list(config.heads), list(config.ffn)))

    def after_step(self, step: int) -> None:
        if step % self.s.snapshot_every == 0:
            heads, ffn = gate_values(self.engine)
            if self.rank == 0:
                self.run.write_snapshot(step, heads, ffn)

    def ticket(self, step: int) -> dict | None:
        """At a step boundary: the ticket all ranks agree on, or None. Rank 0 reads
        RUN/ticket.json; at --search_max_steps without one it draws the ticket itself."""
        config = self.engine.module.config
        present = self.comm.agree(self.rank == 0 and self.run.ticket.exists())
        fallback = not present and step >= self.s.search_max_steps
        if not present and not fallback:
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
                    self.run.publish_ticket(ticket_record(step, reason, "trainer", self.run.fingerprint(), heads, ffn, []))
                box[0] = self.run.read_ticket(config.heads, config.ffn)
            except UserError as e:
                box[0] = str(e)
        found = self.comm.broadcast(box[0])
        if isinstance(found, str):
            raise UserError(found + "; remove it to let the search go on")
        return found

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
        """--ticket_weights rewind: the weights before the search (gates all 1)."""
        full = full_weights(self.engine)
        path = self.run.init_weights
        if self.rank == 0 and not path.exists():
            full.pop(TIED_DECODER, None)  # tied to the word embeddings
            tmp = path.with_name(f".{path.name}.tmp")
            save_file(full, str(tmp))
            tmp.replace(path)
        self.comm.barrier()
