"""BERT MLM pre-training with DeepSpeed and EarlyBERT, resumable from RUN at any moment.

    deepspeed pipeline/train.py --deepspeed_config ds_configs/X.json --data DATA --run_dir RUN
        --model PRESET|CONFIG.json --max_steps N [--earlybird on|off] [--seed 0] [--dropout P]
        [--checkpoint_every K] [--eval_every K] [--max_time SECONDS] [--init_from HF_DIR] ...

Also under torchrun, or plain `python pipeline/train.py ...` (one process). Batch sizes,
precision, optimizer, scheduler and ZeRO stage come from the DeepSpeed config.

The stage comes from RUN: nothing there -> searching stage (gated model, L1, gate snapshots in
RUN/gates/ for `python -m pipeline.monitor`); RUN/ticket.json appears (or --search_max_steps is
reached: the trainer draws the ticket itself) -> checkpoint, RUN/pruned/, exit 76; the same
command again -> efficient stage on the pruned model, continuing step, LR schedule and data.
`--earlybird off` trains the dense model. slurm/pretrain.sh runs the loop.

A stop request (SIGTERM, SIGUSR1, or the file RUN/stop, which works across nodes and launchers)
checkpoints at the next step boundary and exits 75.

Exit codes: 0 done (or already finished); 2 bad input (nothing in RUN touched); 3 the loss
became NaN/inf (a checkpoint of the last good state was written); 75 stopped on SIGTERM/SIGUSR1
or --max_time after a checkpoint; 76 the ticket is drawn and RUN/pruned/ written. After 75 and
76, run the same command again to continue.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.dist import Comm  # noqa: E402
from pipeline.loader import Prefetcher, to_device  # noqa: E402
from pipeline.mfu import peak_flops  # noqa: E402
from pipeline.optim import make_optimizer  # noqa: E402

EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_RELAUNCH = 2, 3, 75, 76
DEFAULT_FFN_MULTIPLE = 64
# fp16: steps in a row that the loss scaler skipped with a NaN/inf loss before the run stops
# (exit 3): a forward that overflows does not recover by lowering the loss scale.
MAX_NONFINITE_SKIPS = 20


class BadInput(Exception):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="a data_prep output directory")
    p.add_argument("--run_dir", required=True, type=Path)
    p.add_argument("--model", required=True, help="a preset (bert-tiny ... bert-large) or a JSON model config")
    p.add_argument("--max_steps", required=True, type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", type=float, default=None, help="hidden and attention dropout (default 0.1)")
    p.add_argument("--attention_dropout", type=float, default=None,
                   help="attention dropout alone (default: --dropout's, else 0.1)")
    p.add_argument("--attention", choices=("sdpa", "varlen"), default="sdpa",
                   help="sdpa: block-diagonal mask (any device, dropout honoured); varlen: variable-length "
                        "flash attention on CUDA (torch's kernel needs --attention_dropout 0)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (not with ZeRO-3)")
    p.add_argument("--prefetch", type=int, default=4, help="micro batches prepared ahead by the loader process")
    p.add_argument("--checkpoint_every", type=int, default=1000)
    p.add_argument("--keep_checkpoints", type=int, default=3)
    p.add_argument("--eval_every", type=int, default=1000)
    p.add_argument("--eval_sequences", type=int, default=4096, help="validation sequences per evaluation")
    p.add_argument("--log_every", type=int, default=1)
    p.add_argument("--max_time", type=float, default=None, help="seconds: checkpoint and stop before this")
    p.add_argument("--init_from", type=Path, default=None, help="a Hugging Face BERT checkpoint directory")
    p.add_argument("--mlm_probability", type=float, default=0.15)
    p.add_argument("--whole_word_masking", action="store_true")
    p.add_argument("--wandb_project", default=None)
    p.add_argument("--wandb_group", default=None)
    p.add_argument("--wandb_entity", default=None)
    p.add_argument("--wandb_mode", choices=("online", "offline", "disabled"), default=None)
    eb = p.add_argument_group("EarlyBERT")
    eb.add_argument("--earlybird", choices=("on", "off"), default="on",
                    help="on: search with gates, draw the ticket, train it; off: the dense model")
    eb.add_argument("--l1", type=float, default=1e-4, help="L1 coefficient on |gate|")
    eb.add_argument("--snapshot_every", type=int, default=10, help="steps between gate snapshots")
    eb.add_argument("--search_min_steps", type=int, default=100, help="the early-bird rule's minimum")
    eb.add_argument("--search_max_steps", type=int, default=400,
                    help="no ticket by then: the trainer draws it from its own gates")
    eb.add_argument("--prune_heads", type=int, default=None,
                    help="heads dropped per layer (default 4 of 12, else a third)")
    eb.add_argument("--prune_ffn", type=float, default=0.3, help="fraction of FFN neurons dropped, globally")
    eb.add_argument("--ffn_multiple", type=int, default=None,
                    help=f"keep every layer's FFN width a multiple of this (default {DEFAULT_FFN_MULTIPLE}; 1: the "
                         "paper's free widths, which on an H100 made a ticket slower than the dense model); "
                         "a resumed search keeps the value it began with")
    eb.add_argument("--ticket", choices=("rule", "random"), default="rule",
                    help="random: a seeded random ticket of the rule's shape (a baseline)")
    eb.add_argument("--ticket_weights", choices=("carry", "rewind"), default="carry",
                    help="carry: searched weights, gates folded; rewind: the weights before the search")
    eb.add_argument("--rewarmup_steps", type=int, default=0,
                    help="efficient stage: ramp the LR up again over this many steps")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    import deepspeed
    deepspeed.add_config_arguments(p)
    a = p.parse_args(argv)
    if a.deepspeed_config is None:
        p.error("--deepspeed_config is required")
    for flag in ("max_steps", "snapshot_every", "checkpoint_every", "search_max_steps", "ffn_multiple",
                 "prefetch"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if not 0.0 <= a.prune_ffn < 1.0:
        p.error(f"--prune_ffn {a.prune_ffn}: must be in [0, 1)")
    if a.prune_heads is not None and a.prune_heads < 0:
        p.error(f"--prune_heads {a.prune_heads}: must be >= 0")
    if a.l1 < 0:
        p.error(f"--l1 {a.l1}: must be >= 0")
    for flag in ("dropout", "attention_dropout"):
        v = getattr(a, flag)
        if v is not None and not 0.0 <= v < 1.0:
            p.error(f"--{flag} {v}: must be in [0, 1)")
    return a


# ------------------------------------------------------------------ set-up (no RUN writes)

def setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain `python pipeline/train.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    import deepspeed
    cuda = torch.cuda.is_available()
    if cuda:  # before the process group: NCCL binds each rank to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return rank, world, device


def load_ds_config(path: Path, max_steps: int, world: int) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not a readable JSON DeepSpeed config ({e})")
    if not isinstance(cfg, dict) or "train_micro_batch_size_per_gpu" not in cfg:
        raise BadInput(f"{path}: a DeepSpeed config needs train_micro_batch_size_per_gpu")
    sched = cfg.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = max_steps
    cfg.setdefault("gradient_accumulation_steps", 1)
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world
    return cfg


def check_data(data: Path, rank: int):
    from data_prep.manifest import load_manifest, verify
    from data_prep.sources import DataPrepError
    try:
        manifest = load_manifest(data)
        # Every rank checks shapes; rank 0 also re-hashes every file.
        problems = verify(data, checksums=rank == 0)
    except DataPrepError as e:
        raise BadInput(str(e))
    if problems:
        raise BadInput(f"{data}: " + "; ".join(problems[:5]))
    if manifest["splits"]["train"]["num_sequences"] == 0:
        raise BadInput(f"{data}: the train split is empty")
    return manifest


def dropout_overrides(a) -> dict:
    over = {} if a.dropout is None else {"dropout": a.dropout, "attention_dropout": a.dropout}
    if a.attention_dropout is not None:
        over["attention_dropout"] = a.attention_dropout
    return over


def build_model(a, manifest: dict):
    from pipeline.hf import load_pretrained
    from pipeline.model import PRESETS, BertConfig, BertForMLM
    over = {**dropout_overrides(a), "gates": a.earlybird == "on"}
    try:
        if a.init_from is not None:
            model = load_pretrained(a.init_from, **over)
        elif a.model in PRESETS:
            model = BertForMLM(BertConfig.preset(a.model, vocab_size=manifest["vocab_size"], **over))
        elif a.model.endswith(".json"):
            model = BertForMLM(BertConfig.from_json(a.model, **over))
        else:
            raise BadInput(f"--model {a.model}: not a preset ({', '.join(PRESETS)}) nor a .json config")
    except (OSError, ValueError, KeyError) as e:
        raise BadInput(f"model: {e}")
    c = model.config
    if c.vocab_size != manifest["vocab_size"]:
        raise BadInput(f"{a.data}/manifest.json: vocabulary of {manifest['vocab_size']} tokens, "
                       f"the model's is {c.vocab_size}")
    if manifest["seq_len"] > c.max_position_embeddings:
        raise BadInput(f"{a.data}/manifest.json: seq_len {manifest['seq_len']} exceeds the model's "
                       f"{c.max_position_embeddings} positions")
    if a.earlybird == "on":
        k = a.prune_heads if a.prune_heads is not None else 0
        if any(k >= h for h in c.heads):
            raise BadInput(f"--prune_heads {a.prune_heads}: the model has {min(c.heads)} heads in a layer; "
                           "at least one must stay")
    return model


def training_dtype(ds_cfg: dict) -> torch.dtype:
    """What the matmuls run in: DeepSpeed's bf16/fp16 sections, or torch autocast, else fp32."""
    if ds_cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    autocast = ds_cfg.get("torch_autocast", {})
    if autocast.get("enabled"):
        return torch.float16 if autocast.get("dtype") in ("float16", "fp16") else torch.bfloat16
    return torch.float32


def resolve_ffn_multiple(flag: int | None, search: dict | None) -> int:
    """A search keeps the FFN multiple it began with (RUN/search.json; one written before the flag
    existed means 1), so a resumed run and a restarted monitor draw the same ticket."""
    if search is None:
        return DEFAULT_FFN_MULTIPLE if flag is None else flag
    began = search.get("ffn_multiple", 1)
    if flag is not None and flag != began:
        raise BadInput(f"--ffn_multiple {flag}: this run's search began with {began} (RUN/search.json); "
                       "leave the flag out or use a new --run_dir")
    return began


def run_identity(a, model, manifest: dict, ds_cfg: dict) -> dict:
    return {"model": model.config.to_dict(), "data": str(a.data.resolve()),
            "data_fingerprint": [manifest["splits"]["train"]["shards"][0]["sha256"], manifest["seq_len"]],
            "micro_batch": ds_cfg["train_micro_batch_size_per_gpu"],
            "gradient_accumulation": ds_cfg["gradient_accumulation_steps"], "seed": a.seed}


# ------------------------------------------------------------------ training

class Trainer:
    def __init__(self, a, rank: int, world: int, device):
        self.a, self.rank, self.world, self.device = a, rank, world, device
        self.stop_signal = 0
        self.wandb = None
        self.comm = Comm(device)

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    def main(self) -> int:
        import deepspeed
        from pipeline.run_dir import RunDir

        a = self.a
        run = self.run = RunDir(a.run_dir)
        done = run.finished_step()
        if done is not None and done >= a.max_steps:
            self.log(f"{run.path}: finished at step {done}; nothing to do")
            return 0
        ds_cfg = load_ds_config(a.deepspeed_config, a.max_steps, self.world)
        manifest = self.manifest = check_data(a.data, self.rank)
        torch.manual_seed(a.seed)
        model = build_model(a, manifest)
        identity = run_identity(a, model, manifest, ds_cfg)
        recorded = run.read_json("run.json")
        if recorded is not None and recorded != identity:
            diff = sorted(k for k in identity if identity[k] != recorded.get(k))
            raise BadInput(f"{run.path}: belongs to a different run (differs in {', '.join(diff)}); "
                           "use a new --run_dir")
        self.phase = "dense" if a.earlybird == "off" else "efficient" if run.pruned_ready() else "search"
        a.ffn_multiple = resolve_ffn_multiple(a.ffn_multiple, run.read_json("search.json") if recorded else None)
        pruned_state = None
        if self.phase == "efficient":
            from pipeline.hf import load_pretrained
            pruned_state = json.loads((run.pruned / "trainer_state.json").read_text())
            model = load_pretrained(run.pruned, **dropout_overrides(a))
        model.l1 = a.l1 / ds_cfg["gradient_accumulation_steps"] if self.phase == "search" else 0.0
        try:
            model.set_attention(a.attention)
        except ValueError as e:
            raise BadInput(str(e))
        try:
            optimizer = make_optimizer(model, ds_cfg, self.device)
        except ValueError as e:
            raise BadInput(f"{a.deepspeed_config}: {e}")
        if a.compile:
            if ds_cfg.get("zero_optimization", {}).get("stage", 0) == 3:
                raise BadInput(f"--compile: not with ZeRO-3 ({a.deepspeed_config}): its parameter "
                               "gathering hooks break the compiled graph; use ZeRO-1 or 2")
            model.compile()  # in place: parameter names, gates and state_dict stay as they are
        try:
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        except Exception as e:  # DeepSpeed raises assertion/validation/value errors for bad configs
            raise BadInput(f"{a.deepspeed_config}: DeepSpeed rejected the config ({type(e).__name__}: {e})")
        self.engine = engine

        # From here on RUN is written.
        from data_prep.files import atomic_write_json
        if self.rank == 0:
            run.checkpoints.mkdir(parents=True, exist_ok=True)
            if recorded is None:
                atomic_write_json(run.path / "run.json", identity)
        self.comm.barrier()
        self.fingerprint = run.fingerprint()
        state = {"step": 0, "consumed": 0, "tokens": 0, "elapsed": 0.0}
        latest = run.latest_checkpoint()
        if latest is not None and self.phase == "efficient" and latest.get("phase") != "efficient":
            latest = None  # the dense model's checkpoint: the efficient stage starts from RUN/pruned
        if latest is not None:
            _, client = engine.load_checkpoint(str(run.checkpoints), tag=latest["tag"])
            state.update(client["trainer"])
            self.log(f"resumed from {latest['tag']} (step {state['step']}, {state['consumed']} samples)")
        elif pruned_state is not None:
            state.update(pruned_state["state"])
            self.log(f"efficient stage: {sum(model.config.heads)} heads, FFN {sum(model.config.ffn)} "
                     f"(ticket of step {pruned_state['ticket_step']}), from step {state['step']}")
        self.ticket_taken_at = pruned_state["state"]["step"] if pruned_state else None
        if self.phase == "search" and a.ticket_weights == "rewind" and state["step"] > 0 \
                and not (run.path / "init.safetensors").exists():
            raise BadInput(f"--ticket_weights rewind: {run.path / 'init.safetensors'} is missing (the "
                           "search began without this flag, so its starting weights were not kept)")
        self._set_lr(state["step"], fast_forward=latest is None)
        if self.rank == 0:
            run.truncate_metrics(state["step"])
        if self.phase == "search" and a.ticket_weights == "rewind" and state["step"] == 0:
            self._save_initial_weights()
        self.wandb = self._wandb(identity)
        if self.rank == 0 and self.phase == "search":  # last: the monitor starts when it appears
            atomic_write_json(run.path / "search.json", {
                "snapshot_every": a.snapshot_every, "min_steps": a.search_min_steps,
                "max_steps": a.search_max_steps, "prune_heads": a.prune_heads,
                "prune_ffn": a.prune_ffn, "ffn_multiple": a.ffn_multiple, "l1": a.l1, "heads": model.config.heads,
                "ffn": model.config.ffn})
        try:
            return self.train(state, ds_cfg)
        finally:
            if self.wandb is not None:
                self.wandb.finish()

    def train(self, state: dict, ds_cfg: dict) -> int:
        from data_prep.reader import MaskingCollator, PackedDataset, ResumableSampler
        a, engine, manifest = self.a, self.engine, self.manifest
        train = PackedDataset(a.data, "train")
        self.val = PackedDataset(a.data, "validation")
        if len(self.val) == 0 and a.eval_every:
            self.log(f"warning: {a.data} has an empty validation split (raise data_prep's "
                     "--val-fraction): no validation rows will be logged")
        tok = None
        if a.whole_word_masking:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(a.data / manifest["tokenizer"]))
        self.collate = MaskingCollator(manifest["vocab_size"], manifest["special_tokens"],
                                       a.mlm_probability, a.whole_word_masking, tok)
        micro, gas = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
        dtype = training_dtype(ds_cfg)
        self.fp16 = bool(ds_cfg.get("fp16", {}).get("enabled"))  # DeepSpeed's loss scaler skips steps
        module = engine.module
        peak, source = peak_flops(self.device, dtype)
        self.log(f"MFU against {peak / 1e12:.1f} TFLOP/s per device ({source})")
        sampler = partial(ResumableSampler, len(train), self.rank, self.world, a.seed, state["consumed"])
        loader = Prefetcher(train, sampler, self.collate, micro, self.rank, a.seed,
                            pin=self.device.type == "cuda", depth=a.prefetch)

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        t_start = time.time() - state["elapsed"]
        last, nonfinite_skips = 0.0, 0  # last: the previous step with its evaluation and checkpoint
        engine.train()
        try:
            if self.phase == "search" and state["step"] < a.max_steps and (ticket := self._ticket(state)) is not None:
                return self._prune_and_exit(state, ticket)
            t0 = time.time()
            while state["step"] < a.max_steps:
                last, t0, wait0 = time.time() - t0, time.time(), loader.wait_s
                at_start = dict(state)
                # One reduction and one read-back per step: [MLM loss, non-pad tokens, sum |gate|,
                # non-finite micro batches, stop requested, out of time, ticket present].
                sums = self.comm.zeros(7)
                flops = 0.0
                for i in range(gas):
                    batch, state["consumed"] = loader.next()
                    loss, n, _ = engine(**to_device(batch, self.device))
                    mlm = loss.detach()
                    if self.phase == "search":
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
                for j, flag in enumerate(self._flags(t_start, max(last, time.time() - t0))):
                    if flag:
                        sums[4 + j] += flag  # a Python scalar: no host-to-device copy to wait for
                loss_sum, tokens, gate_l1, nonfinite, stop, late, ticket_seen = self.comm.sum(sums).tolist()
                if nonfinite and (not self.fp16 or nonfinite_skips >= MAX_NONFINITE_SKIPS):
                    return self._nonfinite(at_start, loss_sum / self.world)  # fp16: the scaler skips it first
                try:
                    engine.step()
                except Exception as e:  # DeepSpeed's loss scaler at its minimum
                    if self.fp16 and "loss scale" in str(e).lower():
                        return self._nonfinite(at_start, loss_sum / self.world)
                    raise
                skipped = not engine.was_step_applied()  # an fp16 overflow: DeepSpeed skipped it
                nonfinite_skips = nonfinite_skips + 1 if skipped and nonfinite else 0
                state["tokens"] += int(tokens)
                if not skipped:
                    state["step"] += 1
                    self._set_lr(state["step"])
                dt = time.time() - t0
                state["elapsed"] = time.time() - t_start
                self._log_step(state, skipped, loss_sum / self.world, gate_l1 / self.world, tokens, dt,
                               flops, peak, loader.wait_s - wait0)
                if not skipped:
                    self._after_step(state)
                if stop or late:
                    return self._stop(state, "stop request" if stop else "--max_time")
                if state["step"] % a.checkpoint_every == 0 and not skipped or state["step"] == a.max_steps:
                    self.checkpoint(state)
                if self.phase == "search" and state["step"] < a.max_steps \
                        and (ticket_seen or state["step"] >= a.search_max_steps) \
                        and (ticket := self._ticket(state)) is not None:
                    return self._prune_and_exit(state, ticket)
        finally:
            loader.close()
        self.evaluate(state["step"])
        self.export(state["step"])
        return 0

    def _flags(self, t_start: float, dt: float) -> list[int]:
        """This rank's view of [stop requested, out of time, ticket present] at a step's end."""
        a = self.a
        stop = bool(self.stop_signal) or (self.rank == 0 and self.run.stop_request.exists())
        # dt: the previous step with its evaluation and checkpoint, or this one so far if longer;
        # twice that, and 10 s for the checkpoint, must still fit
        late = a.max_time is not None and time.time() - t_start + 2 * dt + 10 > a.max_time
        ticket = self.phase == "search" and self.rank == 0 and self.run.ticket.exists()
        return [int(stop), int(late), int(ticket)]

    def _log_step(self, state: dict, skipped: bool, loss: float, gate_l1: float, tokens: float, dt: float,
                  flops: float, peak: float, wait: float) -> None:
        a = self.a
        if not skipped and state["step"] % a.log_every != 0 and state["step"] != a.max_steps:
            return
        row = {"step": state["step"] + int(skipped), "phase": self.phase, "loss": loss,
               "lr": self.engine.get_lr()[0], "tokens": state["tokens"], "step_time_s": dt,
               "elapsed_s": state["elapsed"], "tokens_per_s": tokens / dt,
               # flops and peak both of one rank (every rank's batches are alike in size)
               "mfu": flops / dt / peak, "data_wait_s": wait,
               "samples": state["consumed"]}
        if self.phase == "search":
            row["gate_l1"] = gate_l1
        if skipped:
            row["skipped"] = True  # fp16 overflow: batch consumed, no optimizer step, no LR step
        self._log_row(row)

    def _after_step(self, state: dict) -> None:
        a, step = self.a, state["step"]
        if self.phase == "search" and step % a.snapshot_every == 0:
            self._snapshot(step)
        if a.eval_every and step % a.eval_every == 0 and step < a.max_steps:
            self.evaluate(step)

    def _stop(self, state: dict, why: str) -> int:
        self.checkpoint(state)
        if self.rank == 0:
            self.run.stop_request.unlink(missing_ok=True)  # acted on: the next launch runs
        self.log(f"stopped at step {state['step']} ({why}); checkpointed: run the same command to "
                 f"continue (exit {EXIT_PREEMPTED})")
        return EXIT_PREEMPTED

    def _set_lr(self, step: int, fast_forward: bool = False) -> None:
        """The efficient stage's fresh optimizer follows the LR schedule by global step, with an
        optional linear re-warm-up from the step the ticket was taken."""
        sched = self.engine.lr_scheduler
        if sched is None or self.phase != "efficient":
            return
        if fast_forward and step > 0:
            sched.step(step - 1)  # DeepSpeed's schedulers count from -1: after k steps, k - 1
        n = self.a.rewarmup_steps
        factor = 1.0 if n <= 0 else min(1.0, (step + 1 - self.ticket_taken_at) / n)
        for group, lr in zip(sched.optimizer.param_groups, sched.get_lr()):
            group["lr"] = lr * factor

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = 1

    def _nonfinite(self, at_start: dict, loss: float) -> int:
        self.log(f"error: the loss is {loss} at step {at_start['step'] + 1}: stopping; the "
                 f"checkpoint holds the last good state (step {at_start['step']})")
        self.checkpoint(at_start)
        self._log_row({"step": at_start["step"] + 1, "phase": self.phase, "loss": loss,
                       "lr": self.engine.get_lr()[0], "tokens": at_start["tokens"], "step_time_s": 0.0,
                       "elapsed_s": at_start["elapsed"], "nonfinite": True})
        return EXIT_NONFINITE

    def _log_row(self, row: dict) -> None:
        if self.rank != 0:
            return
        self.run.append_metrics(row)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if "loss" in row:
            print(f"step {row['step']:>6}  {row['phase']:<9}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                  f"{row.get('tokens_per_s', 0):,.0f} tok/s  mfu {row.get('mfu', 0):.1%}",
                  file=sys.stderr, flush=True)

    def _wandb(self, identity: dict):
        a = self.a
        if self.rank != 0 or a.wandb_project is None or (a.wandb_mode or os.environ.get("WANDB_MODE")) == "disabled":
            return None
        import wandb
        from data_prep.files import atomic_write_json
        info = self.run.read_json("wandb.json")
        if info is None:
            import secrets
            run_id = secrets.token_hex(6)
            # The monitor joins the trainer's group (the run id when none is given).
            info = {"id": run_id, "project": a.wandb_project, "entity": a.wandb_entity,
                    "group": a.wandb_group or f"earlybert-{run_id}", "mode": a.wandb_mode}
            atomic_write_json(self.run.path / "wandb.json", info)
        return wandb.init(project=info["project"], group=info["group"], entity=info["entity"],
                          mode=a.wandb_mode, id=info["id"], resume="allow", dir=str(self.run.path),
                          job_type="train",
                          config={**vars(a), **identity, "deepspeed_config": str(a.deepspeed_config)})

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        """MLM loss and accuracy on the validation split, masked with a fixed seed."""
        n_val = min(len(self.val), self.a.eval_sequences)
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
            self._log_row({"step": step, "phase": self.phase, "val_loss": loss_sum / count,
                           "val_accuracy": correct / count})

    def checkpoint(self, state: dict) -> None:
        tag = f"step-{state['step']:07d}"
        tmp = "tmp-" + tag
        self.engine.save_checkpoint(str(self.run.checkpoints), tag=tmp,
                                    client_state={"trainer": dict(state)}, save_latest=False)
        self.comm.barrier()
        if self.rank == 0:
            self.run.publish_checkpoint(tmp, tag, state["step"], self.a.keep_checkpoints, self.phase)
        self.comm.barrier()

    # -- EarlyBERT: snapshots, ticket, pruning

    def _full_weights(self, gates_only: bool = False) -> dict[str, torch.Tensor]:
        """fp32 master weights gathered from every ZeRO partition (a collective: all ranks)."""
        from deepspeed.utils import safe_get_full_fp32_param
        full = {}
        for n, p in self.engine.module.named_parameters():
            if gates_only and not n.endswith("_gates"):
                continue
            t = safe_get_full_fp32_param(p)
            full[n] = (t if t is not None else p.detach()).float().cpu().clone()
        return full

    def _gate_values(self) -> tuple[list, list]:
        g = self._full_weights(gates_only=True)
        layers = range(self.engine.module.config.num_layers)
        return ([g[f"bert.encoder.layer.{i}.attention.self.head_gates"].numpy() for i in layers],
                [g[f"bert.encoder.layer.{i}.intermediate.ffn_gates"].numpy() for i in layers])

    def _snapshot(self, step: int) -> None:
        from pipeline.earlybird import write_snapshot
        heads, ffn = self._gate_values()
        if self.rank == 0:
            write_snapshot(self.run.gates, step, heads, ffn)

    def _save_initial_weights(self) -> None:
        """--ticket_weights rewind: the weights before the search (gates all 1)."""
        from safetensors.torch import save_file
        full = self._full_weights()
        path = self.run.path / "init.safetensors"
        if self.rank == 0 and not path.exists():
            full.pop("cls.predictions.decoder.weight", None)  # tied to the word embeddings
            tmp = path.with_name(".init.safetensors.tmp")
            save_file(full, str(tmp))
            os.replace(tmp, path)
        self.comm.barrier()

    def _ticket(self, state: dict) -> dict | None:
        """At a step boundary: the ticket all ranks agree on, or None. Rank 0 reads
        RUN/ticket.json; at --search_max_steps without one it draws the ticket itself."""
        from pipeline.earlybird import (TicketError, draw_masks, publish_ticket, read_ticket,
                                        ticket_record)
        a, config = self.a, self.engine.module.config
        present = self.comm.agree(self.rank == 0 and self.run.ticket.exists())
        fallback = not present and state["step"] >= a.search_max_steps
        if not present and not fallback:
            return None
        gates = self._gate_values() if fallback else None
        box = [None]
        if self.rank == 0:
            try:
                if fallback:
                    heads, ffn = draw_masks(*gates, a.prune_heads, a.prune_ffn, ffn_multiple=a.ffn_multiple)
                    reason = (f"fallback: no early-bird ticket by the maximum search length "
                              f"(--search_max_steps {a.search_max_steps}); drawn by the trainer from its "
                              f"own gates at step {state['step']}")
                    publish_ticket(self.run.ticket, ticket_record(
                        state["step"], reason, "trainer", self.fingerprint, heads, ffn, []))
                box[0] = read_ticket(self.run.ticket, self.fingerprint, config.heads, config.ffn)
            except TicketError as e:
                box[0] = str(e)
        found = self.comm.broadcast(box[0])
        if isinstance(found, str):
            raise BadInput(found + "; remove it to let the search go on")
        return found

    def _prune_and_exit(self, state: dict, ticket: dict) -> int:
        """Checkpoint the dense state, write RUN/pruned/ (reduced model + where to continue)."""
        from pipeline.earlybird import random_masks
        from pipeline.hf import export
        from pipeline.model import BertForMLM
        from pipeline.prune import prune_state_dict, pruned_config
        a, run = self.a, self.run
        self.checkpoint(state)
        full = self._full_weights() if a.ticket_weights == "carry" else None  # rewind reads init
        heads, ffn = ticket["heads"], ticket["ffn"]
        if a.ticket == "random":
            heads, ffn = random_masks(heads, a.seed), random_masks(ffn, a.seed + 1)
        if self.rank == 0:
            dense = self.engine.module.config
            if a.ticket_weights == "rewind":
                from safetensors.torch import load_file
                weights = prune_state_dict(load_file(str(run.path / "init.safetensors")), dense, heads, ffn,
                                           fold_gates=False)
            else:
                weights = prune_state_dict(full, dense, heads, ffn)
            with torch.device("meta"):
                small = BertForMLM(pruned_config(dense, heads, ffn))
            info = {"state": dict(state), "ticket_step": ticket["step"], "reason": ticket["reason"],
                    "source": ticket.get("source"), "ticket": a.ticket, "weights": a.ticket_weights,
                    "dense": {"heads": dense.heads, "ffn": dense.ffn},
                    "heads": [h.astype(int).tolist() for h in heads], "ffn": [f.astype(int).tolist() for f in ffn]}
            export(small, run.pruned, a.data / self.manifest["tokenizer"], weights,
                   extra={"trainer_state.json": info})
            if self.wandb is not None:
                self.wandb.summary.update({"ticket_step": ticket["step"], "ticket_taken_at": state["step"]})
            self.log(f"ticket of step {ticket['step']} ({ticket['reason']}); {a.ticket} ticket, "
                     f"{a.ticket_weights} weights: heads {small.config.heads}, FFN {small.config.ffn}; "
                     f"{run.pruned} written: run the same command to continue (exit {EXIT_RELAUNCH})")
        self.comm.barrier()
        return EXIT_RELAUNCH

    def export(self, step: int) -> None:
        """RUN/final in Hugging Face format (fp32 master weights, gates folded), then finished.json."""
        from data_prep.files import atomic_write_json
        from pipeline.hf import export, folded_state_dict
        module = self.engine.module
        full = self._full_weights()
        if self.rank == 0:
            export(module, self.run.final, self.a.data / self.manifest["tokenizer"],
                   folded_state_dict(module, full))
            atomic_write_json(self.run.path / "finished.json", {"step": step})
            self.log(f"exported {self.run.final}")
        self.comm.barrier()


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    a = parse_args(argv)
    try:
        rank, world, device = setup_distributed()
        return Trainer(a, rank, world, device).main()
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
