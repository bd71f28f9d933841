"""BERT MLM pre-training with DeepSpeed and EarlyBERT, resumable from RUN at any moment.

    deepspeed pipeline/train.py --deepspeed_config ds_configs/X.json --data DATA --run_dir RUN
        --model PRESET|CONFIG.json --max_steps N [--earlybird on|off] [--seed 0] [--dropout P]
        [--checkpoint_every K] [--eval_every K] [--max_time SECONDS] [--init_from HF_DIR] ...

Also under torchrun (`-m pipeline.train`), or `python -m pipeline.train ...` (one process). Batch
sizes, precision, optimizer, scheduler and ZeRO stage come from the DeepSpeed config; every other
setting is pipeline/settings.py's (`--help` lists them).

The stage comes from RUN: nothing there -> searching stage (gated model, L1, gate snapshots in
RUN/gates/, watched by `python -m pipeline.monitor`); the early-bird rule fires on a snapshot (the
trainer applies it at the snapshot's step, the monitor the same rule to the same files), or
--search_max_steps is reached -> RUN/ticket.json, checkpoint, RUN/pruned/, exit 76; the same
command again -> efficient stage on the pruned model, continuing step, LR schedule and data.
`--earlybird off` trains the dense model. slurm/pretrain.sh runs the loop.

A stop request (SIGTERM, SIGUSR1, or the file RUN/stop, which works across nodes and launchers)
checkpoints at the next step boundary and exits 75.

Exit codes: 0 done (or already finished); 2 bad input (nothing in RUN touched); 3 the loss
became NaN/inf (a checkpoint of the last good state was written), or non-finite gradients reached
the weights or were skipped MAX_NONFINITE_SKIPS times in a row (no checkpoint of NaN weights is
ever written: latest.json keeps the last good one); 74 no space left on device (the partial write
removed, the last good copy kept: free space and run the same command again); 75 stopped on SIGTERM/SIGUSR1
or --max_time after a checkpoint; 76 the ticket is drawn and RUN/pruned/ written. After 75 and
76, run the same command again to continue.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from functools import partial

import deepspeed
import psutil
import torch

from data_prep.reader import MaskingCollator, PackedDataset, ResumableSampler
from pipeline.dist import Comm
from pipeline.engine import (build_model, check_data, full_weights, load_ds_config, load_pruned, make_engine,
                             run_identity, setup_distributed, training_dtype, weights_finite)
from pipeline.errors import exit_on_user_error, writing
from pipeline.hf import export, folded_state_dict
from pipeline.loader import Prefetcher, to_device
from pipeline.metrics import Metrics
from pipeline.mfu import peak_flops
from pipeline.run_dir import RunDir, TrainState
from pipeline.search import Search
from pipeline.settings import SearchSettings, TrainSettings, add_arguments, check_or_exit, from_namespace
from pipeline.stage import Phase, check_identity, locate

EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_RELAUNCH = 3, 75, 76
# Steps in a row that DeepSpeed skipped for NaN/inf gradients before the run stops (exit 3): fp16's
# loss scaler skips an overflow and lowers the scale, ZeRO-1/2 and bf16 skip non-finite gradients
# in any precision; a forward or a batch that keeps overflowing does not recover by skipping.
MAX_NONFINITE_SKIPS = 20


class NonFiniteWeights(Exception):
    """The weights hold NaN/inf (a non-finite gradient was applied): they are never checkpointed."""


def parse_args(argv=None) -> tuple[TrainSettings, SearchSettings]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, TrainSettings, skip=("deepspeed_config",))  # DeepSpeed adds its own flag
    add_arguments(p.add_argument_group("EarlyBERT"), SearchSettings)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher (the rank comes from the environment)")
    deepspeed.add_config_arguments(p)
    a = p.parse_args(argv)
    if a.deepspeed_config is None:
        p.error("--deepspeed_config is required")
    settings, search = from_namespace(TrainSettings, a), from_namespace(SearchSettings, a)
    check_or_exit(p, settings, search)
    return settings, search


@dataclass
class StepResult:
    """One optimizer step, reduced over ranks: the means of rank-summed values divide by world."""
    loss: float          # MLM loss (without the L1 term), summed over ranks
    tokens: float        # non-padding tokens, all ranks
    gate_l1: float       # sum |gate|, summed over ranks
    flops: float         # this rank's model FLOPs
    flops_all: float     # model FLOPs, all ranks
    fatal: bool          # the loss is NaN/inf and the run must stop (exit 3)
    skipped: bool        # an fp16 overflow: DeepSpeed skipped the update
    stop: bool           # a stop request reached some rank
    late: bool           # --max_time leaves no room for another step


class Trainer:
    def __init__(self, s: TrainSettings, search: SearchSettings, rank: int, world: int, device: torch.device):
        """Checks the input and builds the engine; RUN is not written (bad input: UserError)."""
        self.s, self.rank, self.world, self.device = s, rank, world, device
        self.launched_at = psutil.Process().create_time()  # --max_time counts this launch's start-up
        self.run, self.comm, self.stop_signal = RunDir(s.run_dir), Comm(device), 0
        self.ds_cfg = load_ds_config(s.deepspeed_config, s.max_steps, world)
        self.gas = self.ds_cfg["gradient_accumulation_steps"]
        self.fp16 = bool(self.ds_cfg.get("fp16", {}).get("enabled"))  # DeepSpeed's loss scaler skips steps
        self.manifest = check_data(s.data, rank)
        torch.manual_seed(s.seed)
        model = build_model(s, search, self.manifest)
        self.start = locate(self.run, s, search)
        self.phase = self.start.phase
        self.identity = run_identity(s, model, self.manifest, self.ds_cfg,
                                     self.start.search if self.phase != Phase.DENSE else None)
        self.recorded = self.run.read_identity()
        check_identity(self.run, self.recorded, self.identity, self.phase)
        if self.phase == Phase.EFFICIENT:
            model = load_pruned(s, self.run.pruned)
        # Each micro batch's loss carries the whole l1 x sum |gate|: DeepSpeed's backward divides
        # every micro batch by the accumulation steps, so the step's gates see l1 once, whatever
        # the accumulation (it used to be divided here as well: l1 / gas per step).
        model.l1 = self.start.search.l1 if self.phase == Phase.SEARCH else 0.0
        self.engine = make_engine(model, s, self.ds_cfg, device, gates_apart=self.phase == Phase.SEARCH
                                  and self.start.search.gate_lr == "peak")
        self.metrics = Metrics(self.run, rank)
        self.search = Search(self.engine, self.run, self.comm, rank, self.start.search, s.seed,
                             s.data / self.manifest["tokenizer"], self.log) if self.phase == Phase.SEARCH else None
        self.train_data, self.val = PackedDataset(s.data, "train"), PackedDataset(s.data, "validation")
        self.collate = self._collator()
        self.peak, source = peak_flops(device, training_dtype(self.ds_cfg))
        self.log(f"MFU against {self.peak / 1e12:.1f} TFLOP/s per device ({source})")
        self.nonfinite_skips = 0

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    def run_all(self) -> int:
        state = self.resume()
        try:
            return self.train(state)
        except NonFiniteWeights as e:
            latest = self.run.latest_checkpoint()
            last = f"{latest['tag']} (step {latest['step']})" if latest else "none yet"
            self.log(f"error: {e}; not checkpointed: the last good checkpoint stays {last}. A relaunch "
                     "continues from it with the same batches: change what made the gradient non-finite first")
            return EXIT_NONFINITE
        finally:
            self.metrics.finish()

    def resume(self) -> TrainState:
        """From here on RUN is written: run.json, the state to continue from, W&B, RUN/search.json."""
        run, start, s = self.run, self.start, self.s
        if self.rank == 0:
            run.checkpoints.mkdir(parents=True, exist_ok=True)
            if self.recorded is None:
                run.write_identity(self.identity)
        self.comm.barrier()
        state = start.initial_state()
        if start.checkpoint is not None:
            _, client = self.engine.load_checkpoint(str(run.checkpoints), tag=start.checkpoint["tag"])
            state = TrainState.from_dict(client.get("trainer"), f"{run.checkpoints / start.checkpoint['tag']}: trainer state")
            self.log(f"resumed from {start.checkpoint['tag']} (step {state.step}, {state.consumed} samples)")
        elif start.pruned is not None:
            c = self.engine.module.config
            self.log(f"efficient stage: {sum(c.heads)} heads, FFN {sum(c.ffn)} "
                     f"(ticket of step {start.pruned['ticket_step']}), from step {state.step}")
        self.set_lr(state.step, fast_forward=start.checkpoint is None)
        if self.rank == 0:
            run.truncate_metrics(state.step)
        if len(self.val) == 0 and s.eval_every:
            self.log(f"warning: {s.data} has an empty validation split (raise data_prep's "
                     "--val-fraction): no validation rows will be logged")
        self.metrics.start_wandb(s, start.search, self.identity)
        if self.search is not None:
            self.search.begin(state.step)
        return state

    def train(self, state: TrainState) -> int:
        s = self.s
        loader = self.loader(state)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        t_start = time.time() - state.elapsed
        last, t0 = 0.0, time.time()  # last: the previous step with its evaluation and checkpoint
        self.engine.train()
        try:
            if state.step < s.max_steps and (ticket := self.ticket(state, check=True)) is not None:
                return self.prune(state, ticket)
            while state.step < s.max_steps:
                last, t0, wait0 = time.time() - t0, time.time(), loader.wait_s
                at_start = replace(state)
                r = self.step(state, loader, t_start, t0, last)
                if r.fatal:
                    return self.nonfinite(at_start, r.loss / self.world)
                self.log_step(state, r, time.time() - t0, loader.wait_s - wait0)
                due = not r.skipped and self.after_step(state.step)
                if r.stop or r.late:
                    return self.stop(state, "stop request" if r.stop else "--max_time")
                if state.step % s.checkpoint_every == 0 and not r.skipped or state.step == s.max_steps:
                    self.checkpoint(state)
                if state.step < s.max_steps and (ticket := self.ticket(state, due)) is not None:
                    return self.prune(state, ticket)
        finally:
            loader.close()
        self.export(state.step)  # a launch killed while exporting resumes here (evaluated already)
        return 0

    # -- the loop's parts
    def step(self, state: TrainState, loader: Prefetcher, t_start: float, t0: float, last: float) -> StepResult:
        """Forward and backward over the accumulation's micro batches, then one all-reduce and one
        read-back: [MLM loss, non-pad tokens, sum |gate|, non-finite micro batches, model FLOPs,
        stop requested, out of time]; then the optimizer step."""
        engine, module, gas = self.engine, self.engine.module, self.gas
        sums, flops = self.comm.zeros(7), 0.0
        for i in range(gas):
            batch, state.consumed = loader.next()
            loss, n, _ = engine(**to_device(batch, self.device))
            mlm = loss.detach()
            if self.phase == Phase.SEARCH:
                penalty = module.last_penalty.to(torch.float64)
                mlm = mlm - module.l1 * penalty
                sums[2] += penalty / gas
            sums[0] += mlm.to(torch.float64) / gas
            sums[3] += (~torch.isfinite(loss.detach())).to(torch.float64)
            sums[1] += float(batch["attention_mask"].sum())
            flops += module.flops(batch["input_ids"].numel(), batch["attention_pairs"], n)
            engine.backward(loss)
            if i < gas - 1:
                engine.step()  # inside the accumulation: DeepSpeed only counts it
        sums[4] += flops  # Python scalars: no host-to-device copy to wait for
        for j, flag in enumerate(self.flags(max(last, time.time() - t0))):
            if flag:
                sums[5 + j] += flag
        loss_sum, tokens, gate_l1, nonfinite, flops_all, stop, late = self.comm.sum(sums).tolist()
        r = StepResult(loss_sum, tokens, gate_l1, flops, flops_all, fatal=False, skipped=False, stop=bool(stop),
                       late=bool(late))
        # fp16: the loss scaler skips a non-finite step first, up to MAX_NONFINITE_SKIPS in a row
        if nonfinite and (not self.fp16 or self.nonfinite_skips >= MAX_NONFINITE_SKIPS):
            r.fatal = True
            return r
        try:
            engine.step()
        except Exception as e:  # DeepSpeed's loss scaler at its minimum
            if self.fp16 and "loss scale" in str(e).lower():
                r.fatal = True
                return r
            raise
        r.skipped = not engine.was_step_applied()  # NaN/inf gradients (or an fp16 overflow): skipped
        self.nonfinite_skips = self.nonfinite_skips + 1 if r.skipped else 0
        if self.nonfinite_skips >= MAX_NONFINITE_SKIPS:  # skipped: the weights are still at_start's
            r.fatal = True
            return r
        state.tokens += int(tokens)
        state.flops += flops_all
        if not r.skipped:
            state.step += 1
        self.set_lr(state.step)  # after a skipped step too: the gates' LR stays theirs
        state.elapsed = time.time() - t_start
        return r

    def flags(self, dt: float) -> list[int]:
        """This rank's view of [stop requested, out of time] at a step's end."""
        s = self.s
        stop = bool(self.stop_signal) or (self.rank == 0 and self.run.stop_requested())
        # --max_time is this launch's, from the process's start. dt: the previous step with its
        # evaluation and checkpoint, or this one so far if longer; twice that, and 10 s for the
        # checkpoint, must still fit
        late = s.max_time is not None and time.time() - self.launched_at + 2 * dt + 10 > s.max_time
        return [int(stop), int(late)]

    def log_step(self, state: TrainState, r: StepResult, dt: float, wait: float) -> None:
        s = self.s
        if not r.skipped and state.step % s.log_every != 0 and state.step != s.max_steps:
            return
        row = {"step": state.step + int(r.skipped), "phase": self.phase, "loss": r.loss / self.world,
               "lr": self.engine.get_lr()[0], "tokens": state.tokens, "step_time_s": dt,
               "elapsed_s": state.elapsed, "tokens_per_s": r.tokens / dt,
               # flops and peak both of one rank (every rank's batches are alike in size)
               "mfu": r.flops / dt / self.peak, "data_wait_s": wait, "samples": state.consumed,
               "train_flops": state.flops}
        if self.phase == Phase.SEARCH:
            row["gate_l1"] = r.gate_l1 / self.world
            row["gate_lr"] = next((g["lr"] for g in self.gate_groups()), row["lr"])
        if r.skipped:
            row["skipped"] = True  # fp16 overflow: batch consumed, no optimizer step, no LR step
        self.metrics.log(row)

    def after_step(self, step: int) -> bool:
        """Snapshot and rule (searching), evaluation (every --eval_every steps and at the last);
        returns whether the rule's ticket is due. Both come before the step's checkpoint, so a
        resume from it does neither again."""
        due = self.search is not None and self.search.after_step(step)
        if self.s.eval_every and step % self.s.eval_every == 0 or step == self.s.max_steps:
            self.evaluate(step)
        return due

    def ticket(self, state: TrainState, check: bool) -> dict | None:
        """The ticket, when searching and the rule's is due (check: ask the search, a collective) or
        --search_max_steps is reached."""
        if self.search is None or not (check or state.step >= self.start.search.search_max_steps):
            return None
        return self.search.ticket(state.step)

    def prune(self, state: TrainState, ticket: dict) -> int:
        """Checkpoint the dense state (tagged ticket-N: kept, for a branch or another prune; not
        again when this launch resumed from it), write RUN/pruned/ (reduced model + where to
        continue)."""
        resumed = self.start.checkpoint
        if not (resumed and resumed["tag"].startswith("ticket-") and resumed["step"] == state.step):
            self.checkpoint(state, prefix="ticket")
        self.search.prune(state, ticket, self.metrics.summary)
        self.log(f"{self.run.pruned} written: run the same command to continue (exit {EXIT_RELAUNCH})")
        return EXIT_RELAUNCH

    def stop(self, state: TrainState, why: str) -> int:
        self.checkpoint(state)
        if self.rank == 0:
            self.run.clear_stop()  # acted on: the next launch runs
        self.log(f"stopped at step {state.step} ({why}); checkpointed: run the same command to "
                 f"continue (exit {EXIT_PREEMPTED})")
        return EXIT_PREEMPTED

    def nonfinite(self, at_start: TrainState, loss: float) -> int:
        """The step was not applied: the weights are still those of at_start, unless an earlier
        update made them NaN (then checkpoint() refuses)."""
        what = f"the loss is {loss}" if not math.isfinite(loss) else \
            f"{self.nonfinite_skips} steps in a row had NaN/inf gradients"
        self.log(f"error: {what} at step {at_start.step + 1}: stopping")
        self.metrics.log({"step": at_start.step + 1, "phase": self.phase, "loss": loss,
                          "lr": self.engine.get_lr()[0], "tokens": at_start.tokens, "step_time_s": 0.0,
                          "elapsed_s": at_start.elapsed, "nonfinite": True})
        self.checkpoint(at_start)
        self.log(f"the checkpoint holds the last good state (step {at_start.step})")
        return EXIT_NONFINITE

    def set_lr(self, step: int, fast_forward: bool = False) -> None:
        """The LR of the step after `step`, where it is not the schedule's (DeepSpeed steps that):
        while searching with --gate_lr peak, the gates' group stays at its peak; the efficient
        stage's fresh optimizer follows the schedule by global step, with an optional linear
        re-warm-up from the step the ticket was taken."""
        sched = self.engine.lr_scheduler
        if self.phase == Phase.SEARCH:
            for group in self.gate_groups():
                group["lr"] = group["peak_lr"]
            return
        if sched is None or self.phase != Phase.EFFICIENT:
            return
        if fast_forward and step > 0:
            sched.step(step - 1)  # DeepSpeed's schedulers count from -1: after k steps, k - 1
        n = self.start.search.rewarmup_steps
        factor = 1.0 if n <= 0 else min(1.0, (step + 1 - self.start.ticket_taken_at) / n)
        for group, lr in zip(sched.optimizer.param_groups, sched.get_lr()):
            group["lr"] = lr * factor

    def gate_groups(self) -> list[dict]:
        """The optimizer's parameter group of the gates, when they have one (--gate_lr peak)."""
        return [g for g in self.engine.optimizer.param_groups if g.get("gates")]

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = 1

    # -- data, evaluation, checkpoints, export
    def _collator(self) -> MaskingCollator:
        tok = None
        if self.s.whole_word_masking:
            from transformers import AutoTokenizer  # heavy: only whole-word masking needs it
            tok = AutoTokenizer.from_pretrained(str(self.s.data / self.manifest["tokenizer"]))
        return MaskingCollator(self.manifest["vocab_size"], self.manifest["special_tokens"],
                               self.s.mlm_probability, self.s.whole_word_masking, tok)

    def loader(self, state: TrainState) -> Prefetcher:
        s = self.s
        sampler = partial(ResumableSampler, len(self.train_data), self.rank, self.world, s.seed, state.consumed)
        return Prefetcher(self.train_data, sampler, self.collate, self.engine.train_micro_batch_size_per_gpu(),
                          self.rank, s.seed, pin=self.device.type == "cuda", depth=s.prefetch)

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        """MLM loss and accuracy on the validation split, masked with a fixed seed."""
        n_val = min(len(self.val), self.s.eval_sequences)
        if n_val == 0:
            return
        self.engine.eval()
        module, l1 = self.engine.module, self.engine.module.l1
        module.l1 = 0.0
        sums = self.comm.zeros(3)  # loss x predictions, predictions, correct
        micro = self.engine.train_micro_batch_size_per_gpu()
        n_batches = math.ceil(n_val / (micro * self.world))
        for i in range(n_batches):  # every rank runs the same number of forwards (ZeRO-3)
            start = i * micro * self.world + self.rank * micro
            # Batch s holds sequences s..s+micro-1 masked with seed s, whatever the world size.
            idx = list(range(start, min(start + micro, n_val))) or [0]
            batch = self.collate(*self.val.batch(idx), torch.Generator().manual_seed(start))
            loss, n, correct = self.engine(**to_device(batch, self.device))
            if start < n_val:
                sums[0] += loss.detach().to(torch.float64) * n
                sums[1] += n
                sums[2] += correct.to(torch.float64)
        loss_sum, count, correct = self.comm.sum(sums).tolist()
        module.l1 = l1
        self.engine.train()
        if count > 0:
            self.metrics.log({"step": step, "phase": self.phase, "val_loss": loss_sum / count,
                              "val_accuracy": correct / count})

    def checkpoint(self, state: TrainState, prefix: str = "step") -> None:
        # A NaN gradient with a finite loss may have been applied (no ZeRO, or a clipping that
        # spreads NaN): the weights are checked before they can become "the last good state".
        if not weights_finite(self.engine, self.comm):
            raise NonFiniteWeights(f"the weights hold NaN/inf after step {state.step} (a non-finite "
                                   "gradient was applied)")
        tag = f"{prefix}-{state.step:07d}"
        tmp = "tmp-" + tag
        partial = self.run.checkpoints / tmp  # out of space: removed, latest.json's stays
        with writing(partial, partial=[partial]):
            self.engine.save_checkpoint(str(self.run.checkpoints), tag=tmp,
                                        client_state={"trainer": state.to_dict()}, save_latest=False)
        self.comm.barrier()
        if self.rank == 0:
            with writing(self.run.checkpoints / tag, partial=[partial]):
                self.run.publish_checkpoint(tmp, tag, state.step, self.s.keep_checkpoints, self.phase)
        self.comm.barrier()

    def export(self, step: int) -> None:
        """RUN/final in Hugging Face format (fp32 master weights, gates folded), then finished.json."""
        module = self.engine.module
        full = full_weights(self.engine)
        if self.rank == 0:
            export(module, self.run.final, self.s.data / self.manifest["tokenizer"], folded_state_dict(module, full))
            self.run.write_finished(step)
            self.log(f"exported {self.run.final}")
        self.comm.barrier()


@exit_on_user_error
def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    settings, search = parse_args(argv)
    rank, world, device = setup_distributed()
    done = RunDir(settings.run_dir).finished_step()
    if done is not None and done >= settings.max_steps:
        if rank == 0:
            print(f"{settings.run_dir}: finished at step {done}; nothing to do", file=sys.stderr, flush=True)
        return 0
    return Trainer(settings, search, rank, world, device).run_all()


if __name__ == "__main__":
    sys.exit(main())
