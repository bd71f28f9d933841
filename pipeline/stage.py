"""Where a run stands: which stage the next launch trains and what it starts from.

`locate` only reads RUN; it runs before anything is written, so bad input leaves RUN untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import StrEnum

from pipeline.errors import UserError
from pipeline.run_dir import RunDir, TrainState
from pipeline.settings import DEFAULT_FFN_MULTIPLE, SearchSettings, TrainSettings


class Phase(StrEnum):
    """What this launch trains (logged as each metrics row's `phase`)."""
    SEARCH = "search"        # the gated dense model, L1 on the gates, until the ticket
    EFFICIENT = "efficient"  # the pruned model from RUN/pruned/
    DENSE = "dense"          # --earlybird off: the dense model, no gates


@dataclass
class Start:
    """A launch's starting point."""
    phase: Phase
    search: SearchSettings    # with ffn_multiple resolved
    checkpoint: dict | None   # RUN/checkpoints/latest.json of this phase's model, to resume from
    pruned: dict | None       # RUN/pruned/trainer_state.json (efficient stage)

    @property
    def ticket_taken_at(self) -> int | None:
        """The step the ticket was taken (the efficient stage's re-warm-up counts from it)."""
        return None if self.pruned is None else self.pruned["state"].step

    def initial_state(self) -> TrainState:
        """Before any checkpoint: step 0, or where the search stopped for the efficient stage."""
        return replace(self.pruned["state"]) if self.pruned is not None and self.checkpoint is None \
            else TrainState()


def resolve_ffn_multiple(flag: int | None, began: SearchSettings | None, where: str = "RUN/search.json") -> int:
    """A search keeps the FFN multiple it began with (RUN/search.json; one written before the flag
    existed means 1), so a resumed run and a restarted monitor draw the same ticket."""
    if began is None:
        return DEFAULT_FFN_MULTIPLE if flag is None else flag
    if flag is not None and flag != began.ffn_multiple:
        raise UserError(f"--ffn_multiple {flag}: this run's search began with {began.ffn_multiple} "
                        f"({where}); leave the flag out or use a new --run_dir")
    return began.ffn_multiple


def locate(run: RunDir, settings: TrainSettings, search: SearchSettings) -> Start:
    """The phase from RUN (RUN/pruned/ ready: efficient; else search, or dense with --earlybird
    off), the checkpoint of that phase to resume from, and the search settings in force."""
    if settings.earlybird == "off":
        phase = Phase.DENSE
    else:
        phase = Phase.EFFICIENT if run.pruned_ready() else Phase.SEARCH
    began = run.read_search() if run.read_identity() is not None else None
    search = replace(search, ffn_multiple=resolve_ffn_multiple(search.ffn_multiple,
                                                               began.settings if began else None,
                                                               str(run.search_json)))
    if began is not None and "gate_lr" not in began.present:
        # begun before the gates had an LR of their own: its checkpoints hold two parameter groups
        search = replace(search, gate_lr="schedule")
    checkpoint = run.latest_checkpoint()
    if checkpoint is not None and phase == Phase.EFFICIENT and checkpoint.get("phase") != Phase.EFFICIENT:
        checkpoint = None  # the dense model's checkpoint: the efficient stage starts from RUN/pruned
    pruned = run.read_pruned_state() if phase == Phase.EFFICIENT else None
    if phase == Phase.SEARCH and search.ticket_weights == "rewind" and checkpoint is not None \
            and checkpoint["step"] > 0 and not run.init_weights.exists():
        raise UserError(f"--ticket_weights rewind: {run.init_weights} is missing (the search began before "
                        "its starting weights were kept)")
    return Start(phase, search, checkpoint, pruned)


# The search settings that still shape the result in each phase: until the ticket is drawn, all
# but what the ticket becomes (--ticket, --ticket_weights: the launch that prunes applies its own,
# recorded in RUN/pruned/trainer_state.json; the starting weights are kept for either, so a branch
# of pipeline.experiment can resume a copy of the search with another choice); afterwards only the
# efficient stage's re-warm-up (the rest may change on a restart).
MATTERS = {Phase.SEARCH: tuple(f.name for f in fields(SearchSettings) if f.name not in ("ticket", "ticket_weights")),
           Phase.EFFICIENT: ("rewarmup_steps",), Phase.DENSE: ()}


def check_identity(run: RunDir, recorded: dict | None, identity: dict, phase: Phase) -> None:
    """This launch must be the run RUN/run.json records: the same model, data, batch and seed, and
    the same EarlyBERT settings while they matter. A run.json written before the settings were part
    of it is compared with RUN/search.json, which every search launch rewrote with its flags."""
    if recorded is None:
        return
    diff = sorted(k for k in identity if k != "search" and identity[k] != recorded.get(k))
    if diff:
        raise UserError(f"{run.path}: belongs to a different run (differs in {', '.join(diff)}); "
                        "use a new --run_dir")
    was = recorded.get("search")
    if was is None:  # only what the older search.json held can be compared
        began = run.read_search()
        was = {k: v for k, v in began.settings.to_record().items() if k in began.present} if began else None
    now = identity.get("search")
    if was is None or now is None:
        return
    changed = [f"--{k} {now[k]} (the run's: {was.get(k)})" for k in MATTERS[phase]
               if k in was and now[k] != was[k]]
    if changed:
        raise UserError(f"{run.run_json}: this run searches with other settings: {'; '.join(changed)}; "
                        "give the run's values, or use a new --run_dir")
