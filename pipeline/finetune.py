"""Fine-tunes a pre-trained BERT (an export of this pipeline, dense or pruned, or a Hugging Face
BERT directory) on a task, and evaluates it with the task's official metrics after each epoch.

    python -m pipeline.finetune --model DIR --task TASK --out RUN [--data_dir DIR]
        [--epochs 3] [--lr 2e-5] [--batch_size 32] [--max_seq_len 128] [--seed 0] [--warmup 0.1]
        [--dropout P] [--deepspeed_config ds_configs/X.json]
        [--text_fields a[,b] --label_field y (--dev PATH | --dev_fraction F) [--task_type ...]]
        [--earlybird on|off] [--search_fraction 0.2] [--search_floor_steps 50] [--ticket_epochs 2]
        [--ticket_lr_scale 2]
        [EarlyBERT search flags: --l1 --prune_heads --prune_ffn --ticket --ticket_weights ...]
        [--wandb_project P] [--wandb_mode ...]

TASK: glue:NAME (cola sst2 mrpc stsb qqp mnli qnli rte wnli, GLUE's layout in --data_dir),
squad:v1 / squad:v2 (train-v1.1.json, dev-v1.1.json, ... in --data_dir), csv:PATH, jsonl:PATH.
GLUE and SQuAD without --data_dir: the Hugging Face hub (or the local datasets cache).
Engines (pipeline/finetune_engine.py): plain PyTorch on one process or DDP under torchrun; with
--deepspeed_config, DeepSpeed under the deepspeed launcher, torchrun or python. --batch_size is
the global batch, split evenly over the processes.

--earlybird on (the paper's fine-tuning protocol, in one command): gates on every head and FFN
neuron and the L1 term over --search_fraction of the first epoch (raised to --search_floor_steps,
at most half the epoch), snapshots to RUN/gates/ and the
early-bird rule on them (pipeline/search.py, the same object pre-training calls: a monitor can
watch), the ticket (or the fallback at the search's end) pruned into RUN/pruned/ (by default 4 of
12 heads and 40 % of FFN neurons, rewound to the pre-trained weights), then the ticket fine-tuned
for --ticket_epochs at --lr x --ticket_lr_scale in the same process. results.json states each
stage's time. --ticket random: a random ticket of the same shape (the baseline).

RUN follows pre-training's rules: RUN/finetune.json records the settings (a rerun with others is
refused), RUN/metrics.jsonl gets a row every --log_every steps and one per dev set and epoch,
RUN/checkpoint/ is written after each epoch and on SIGTERM/SIGUSR1 or a file RUN/stop (then exit
75), rerunning the same command continues from it (bit-identical on the CPU in fp32), and a
finished RUN (RUN/results.json, RUN/final/) exits 0 at once.
RUN/final/ loads with transformers' matching Auto class (AutoModelForSequenceClassification,
AutoModelForQuestionAnswering; a pruned model with trust_remote_code=True).

Exit codes: 0 done; 2 bad input (named; nothing written); 74 out of disk space; 75 stopped by a
signal after a checkpoint (run the same command to continue).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from data_prep.files import atomic_write_json, fsync_tree, replace_dir
from pipeline import task_metrics as tm
from pipeline.dist import Comm, free_port
from pipeline.errors import UserError, exit_on_user_error, writing
from pipeline.finetune_engine import DeepSpeedEngine, TorchEngine, finetune_ds_config
from pipeline.metrics import Metrics
from pipeline.run_dir import RunDir, TrainState
from pipeline.search import Search
from pipeline.settings import (FinetuneSettings, SearchSettings, add_arguments, check_or_exit, field_of,
                               from_namespace, json_object)
from pipeline.squad import decode, featurize
from pipeline.task_model import from_pretrained, from_pruned, save
from pipeline.tasks import REGRESSION, SQUAD, TaskArgs, load_task

EXIT_PREEMPTED = 75
METRICS = {"accuracy": tm.accuracy, "f1": tm.f1_binary, "matthews": tm.matthews, "pearson": tm.pearson,
           "spearman": tm.spearman}
DENSE, SEARCH, EFFICIENT = "finetune", "search", "efficient"  # the phases (metrics rows' "phase")


def parse_args(argv=None) -> tuple[FinetuneSettings, SearchSettings]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, FinetuneSettings)
    add_arguments(p.add_argument_group("EarlyBERT (--earlybird on; the fine-tuning preset's defaults)"),
                  SearchSettings, skip=("rewarmup_steps", "gate_lr"))
    p.set_defaults(**SearchSettings.finetune_defaults())
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    s, search = from_namespace(FinetuneSettings, a), from_namespace(SearchSettings, a)
    check_or_exit(p, s, search)
    return s, search


def setup() -> tuple[int, int, torch.device]:
    """The launcher's process group (torchrun, deepspeed), or a group of one (gloo on CPU, NCCL on
    a GPU): the search's collectives (pipeline/dist.py) run the same either way."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if dist.is_initialized():  # main() called again in one process (tests)
        pass
    elif "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    else:  # a group of one on a free local port, the environment left alone but for DeepSpeed's LOCAL_RANK
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine asserts it is set
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def search_length(fraction: float, floor: int, epoch: int) -> int:
    """The searching stage's steps: FRACTION of the first EPOCH's steps, raised to FLOOR, but by
    the floor to at most half the epoch (a longer search eats the time the ticket saves)."""
    return max(1, math.ceil(fraction * epoch), min(floor, math.ceil(epoch / 2)))


class Finetune:
    def __init__(self, s: FinetuneSettings, search: SearchSettings, rank: int, world: int, device: torch.device):
        """Reads and checks everything (task, model, tokenizer, RUN); writes nothing."""
        self.s, self.rank, self.world, self.device = s, rank, world, device
        self.run, self.comm, self.stop_signal = RunDir(s.out), Comm(device), False
        if s.batch_size % world:
            raise UserError(f"--batch_size {s.batch_size}: must divide among the {world} processes")
        self.task = load_task(s.task, TaskArgs(s.data_dir, tuple(filter(None, (s.text_fields or "").split(","))),
                                               s.label_field, s.dev, s.dev_fraction, s.task_type, s.seed))
        self.ds_config, self.notes = finetune_ds_config(s.deepspeed_config, s.batch_size, world) \
            if s.deepspeed_config is not None else (None, [])
        torch.manual_seed(s.seed)
        self.model = from_pretrained(s.model, self.task, gates=s.earlybird == "on", **s.dropout_overrides())
        self.tokenizer = load_tokenizer(s.model)
        self.train_set = self.features(self.task.train, train=True)
        self.dev_sets = {name: (examples, self.features(examples, train=False))
                         for name, examples in self.task.dev.items()}
        n = len(self.train_set["input_ids"])
        self.steps_per_epoch = max(1, n // s.batch_size if world > 1 else math.ceil(n / s.batch_size))
        self.search_settings = None
        if s.earlybird == "on":
            search.check_model(self.model.config.heads)
            self.search_settings = search.for_search_length(
                search_length(s.search_fraction, s.search_floor_steps, self.steps_per_epoch))
        # the processes and the DeepSpeed config's content too: ZeRO partitions (and the batch
        # split) follow them, so a resume with others is refused here, not in DeepSpeed
        self.identity = {"model": self.model.config.to_dict(), "finetune": s.identity(),
                         "search": None if self.search_settings is None else self.search_settings.to_record(),
                         "processes": world, "deepspeed": self.ds_config}
        recorded = self.run.read_identity()
        if recorded is not None and recorded != json.loads(json.dumps(self.identity)):
            raise UserError(f"{self.run.run_json}: RUN was started with other settings "
                            f"({self._changed(recorded)}); use another --out")
        self.phase = DENSE if s.earlybird == "off" else EFFICIENT if self.run.pruned_ready() else SEARCH
        self.offset = 0  # the step the phase's schedule starts at (the efficient stage: the ticket's)
        if self.phase == EFFICIENT:
            self.enter_efficient(self.run.read_pruned_state()["state"].step)
        self.metrics = Metrics(self.run, rank)
        self.search = None
        self.last_results: dict[str, dict[str, float]] = {}  # the last evaluation's, for results.json
        self.build_engine()

    def _changed(self, recorded: dict) -> str:
        before, now = recorded.get("finetune", {}), self.identity["finetune"]
        changed = [f"--{k} {before.get(k)!r} -> {now[k]!r}" for k in now if before.get(k) != now[k]]
        if not changed and recorded.get("processes") != self.identity["processes"]:
            changed = [f"{recorded.get('processes')} process(es) -> {self.identity['processes']}"]
        if not changed and recorded.get("deepspeed") != self.identity["deepspeed"]:
            changed = [f"the content of {self.s.deepspeed_config}"]
        return ", ".join(changed) or "the model or the EarlyBERT settings"

    def build_engine(self) -> None:
        """The engine around the model now trained (the efficient stage rebuilds it for the ticket)."""
        s = self.s
        self.engine = TorchEngine(self.model, s.lr, s.weight_decay, self.comm, self.world, self.device) \
            if self.ds_config is None else \
            DeepSpeedEngine(self.model, s.lr, s.weight_decay, self.ds_config, s.deepspeed_config, self.comm,
                            self.world, self.device)
        self.model = self.engine.module
        self.model.l1 = self.search_settings.l1 if self.phase == SEARCH else 0.0

    def enter_efficient(self, step: int) -> None:
        """The ticket from RUN/pruned/, fine-tuned from STEP on with its own schedule."""
        self.phase, self.offset = EFFICIENT, step
        self.model = from_pruned(self.run.pruned, self.task, **self.s.dropout_overrides())
        # dropout's RNG from here on depends on the step alone: switching in-process after the
        # ticket and a relaunch that starts from RUN/pruned/ train the same
        torch.manual_seed(self.s.seed * 1000003 + step)

    # -- the schedule of the current phase
    @property
    def epochs(self) -> int:
        return self.s.ticket_epochs if self.phase == EFFICIENT else self.s.epochs

    @property
    def phase_end(self) -> int:
        """The global step this phase ends at (the search ends earlier, at its ticket)."""
        if self.phase == SEARCH:
            return self.search_settings.search_max_steps
        return self.offset + self.epochs * self.steps_per_epoch

    def lr_at(self, step: int) -> float:
        """Linear warm-up over --warmup of the phase's steps, then linear decay to 0 (BERT's
        schedule; the search runs on the dense schedule's start). The ticket: --lr x --ticket_lr_scale."""
        total = self.epochs * self.steps_per_epoch
        peak = self.s.lr * (self.s.ticket_lr_scale if self.phase == EFFICIENT else 1.0)
        local, warm = step - self.offset, int(self.s.warmup * total)
        if local < warm:
            return peak * (local + 1) / warm
        return peak * max(0.0, (total - local) / max(1, total - warm))

    # -- data
    def features(self, examples: list, train: bool) -> dict[str, torch.Tensor]:
        """Token ids, masks and targets of every example (SQuAD: of every window)."""
        s, t = self.s, self.tokenizer
        if self.task.kind == SQUAD:
            f = featurize(examples, t, s.max_seq_len, s.doc_stride)
            out = {"input_ids": f.input_ids, "attention_mask": f.attention_mask, "token_type_ids": f.token_type_ids}
            if train:
                out.update(start_positions=f.start, end_positions=f.end)
            else:
                out["_features"] = f
            return {k: torch.as_tensor(v) if k != "_features" else v for k, v in out.items()}
        columns = list(zip(*(e.texts for e in examples)))
        enc = t(list(columns[0]), list(columns[1]) if len(columns) > 1 else None, truncation=True,
                max_length=s.max_seq_len, padding="max_length", return_tensors="pt")
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        dtype = torch.float32 if self.task.kind == REGRESSION else torch.long
        out["labels"] = torch.tensor([e.label for e in examples], dtype=dtype)
        return out

    def batches(self, step: int):
        """This process's share of each global batch from global STEP to the end of its epoch;
        each epoch of each phase has its own seeded order, so a resumed run sees what it would have."""
        epoch, at = divmod(step - self.offset, self.steps_per_epoch)
        n = len(self.train_set["input_ids"])
        seed = self.s.seed * 1000003 + epoch + (10007 if self.phase == EFFICIENT else 0)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for i in range(at, self.steps_per_epoch):
            idx = order[i * self.s.batch_size:(i + 1) * self.s.batch_size][self.rank::self.world]
            yield {k: v[idx].to(self.device) for k, v in self.train_set.items()}

    # -- the loop
    def run_all(self) -> int:
        state = self.resume()
        self.start_run(state)
        t0, base = time.time(), state.elapsed
        while state.step < self.phase_end:
            for batch in self.batches(state.step):
                loss = self.train_step(batch, state.step)
                state.step += 1
                state.consumed += self.s.batch_size
                state.elapsed = base + time.time() - t0
                self.log_step(state, loss)
                if self.phase == SEARCH and self.after_search_step(state):
                    break  # the ticket: the efficient stage starts at this step
                epoch_end = (state.step - self.offset) % self.steps_per_epoch == 0
                if not epoch_end and self.stop_requested():  # an epoch's end: after its evaluation
                    return self.stop(state)
            else:
                if self.phase != SEARCH:
                    self.evaluate(state, (state.step - self.offset) // self.steps_per_epoch)
                state.elapsed = base + time.time() - t0
                self.checkpoint(state)
                if state.step < self.phase_end and self.stop_requested():
                    return self.stop(state, checkpointed=True)
        self.finish(state)
        return 0

    def after_search_step(self, state: TrainState) -> bool:
        """The search's plug-in point (pipeline/search.py, as in pre-training): a gate snapshot and
        the rule; at the ticket, RUN/pruned/ and the switch to the ticket in this process."""
        self.search.after_step(state.step)
        ticket = self.search.ticket(state.step)
        if ticket is None:
            return False
        self.search.prune(state, ticket, self.metrics.summary)
        self.search = None
        self.engine.close()  # the dense model's optimizer state and buffers go before the ticket's come
        self.enter_efficient(state.step)
        self.build_engine()
        self.log(f"fine-tuning the ticket (heads {self.model.config.heads}, FFN {self.model.config.ffn}) for "
                 f"{self.epochs} epoch(s) at peak lr {self.s.lr * self.s.ticket_lr_scale:.2e}")
        return True

    def train_step(self, batch: dict, step: int) -> float:
        loss = self.engine.step(batch, self.lr_at(step), step)
        if self.phase == SEARCH:  # the task's loss, logged without the L1 term (as pre-training logs it)
            return loss.item() - self.model.l1 * float(self.model.last_penalty)
        return loss.item()

    def log_step(self, state: TrainState, loss: float) -> None:
        if state.step % self.s.log_every and state.step != self.phase_end:
            return
        row = {"step": state.step, "phase": self.phase, "loss": loss, "lr": self.lr_at(state.step - 1),
               "epoch": (state.step - self.offset) / self.steps_per_epoch, "elapsed_s": state.elapsed}
        if self.phase == SEARCH:
            row["gate_l1"] = float(self.model.last_penalty)
        self.metrics.log(row)
        self.log(f"step {state.step:>6}  {self.phase:<9}  loss {loss:.4f}  lr {row['lr']:.2e}")

    def stop_requested(self) -> bool:
        """SIGTERM/SIGUSR1 on any process, or the file RUN/stop."""
        return self.comm.agree(self.stop_signal or (self.rank == 0 and self.run.stop_requested()))

    def stop(self, state: TrainState, checkpointed: bool = False) -> int:
        if not checkpointed:
            self.checkpoint(state)
        if self.rank == 0:
            self.run.clear_stop()  # acted on: the next launch runs
        self.log(f"stopped at step {state.step}: run the same command to continue (exit {EXIT_PREEMPTED})")
        return EXIT_PREEMPTED

    # -- evaluation
    @torch.no_grad()
    def evaluate(self, state: TrainState, epoch: int) -> None:
        """Every dev set's metrics. Every rank runs the same forwards (ZeRO-3 gathers weights in
        collectives) and computes the same figures; rank 0 logs them."""
        results = {}
        self.model.eval()
        for name, (examples, f) in self.dev_sets.items():
            results[name] = self.dev_metrics(examples, f)
            self.metrics.log({"step": state.step, "phase": "eval", "epoch": epoch,
                              **{f"{name}/{k}": v for k, v in results[name].items()}})
            self.log(f"epoch {epoch} {name}: " + "  ".join(f"{k} {v:.4f}" for k, v in results[name].items()))
        self.last_results = results

    def dev_metrics(self, examples: list, f: dict) -> dict[str, float]:
        outputs = []
        inputs = {k: v for k, v in f.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        for i in range(0, len(inputs["input_ids"]), self.s.eval_batch_size):
            batch = {k: v[i:i + self.s.eval_batch_size].to(self.device) for k, v in inputs.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                _, logits = self.model(**batch)
            outputs.append(torch.stack(logits, -1).float().cpu() if self.task.kind == SQUAD else logits.float().cpu())
        out = torch.cat(outputs).numpy()
        if self.task.kind == SQUAD:
            pred = decode(examples, f["_features"], out[..., 0], out[..., 1], v2=self.task.name == "squad:v2")
            return tm.squad_scores(pred, {e.id: e.answers for e in examples})
        gold = f["labels"].numpy()
        pred = out if self.task.kind == REGRESSION else out.argmax(-1)
        return {m: METRICS[m](pred, gold) for m in self.task.metrics}

    # -- RUN: start, checkpoint, resume, finish
    def start_run(self, state: TrainState) -> None:
        if self.rank == 0:
            self.run.path.mkdir(parents=True, exist_ok=True)
            self.run.write_identity(self.identity)
            self.metrics.start(self.s.wandb_project, self.s.wandb_entity, self.s.wandb_group, self.s.wandb_mode,
                               {**self.identity["finetune"], "task_kind": self.task.kind}, "finetune", "finetune")
        self.comm.barrier()
        if self.phase == SEARCH:
            self.search = Search(self.engine, self.run, self.comm, self.rank,
                                 self.search_settings, self.s.seed, self.s.model, self.log)
            self.search.begin(state.step)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGUSR1, self._on_signal)
        self.log(f"{self.task.name}: {len(self.train_set['input_ids']):,} training examples, "
                 f"{self.steps_per_epoch} steps per epoch; {self.phase} from step {state.step}; "
                 f"{self.engine.describe()} on {self.world} process(es)")
        for note in self.task.notes + self.notes:
            self.log(note)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = True

    @property
    def checkpoint_dir(self) -> Path:
        return self.run.path / "checkpoint"

    def checkpoint(self, state: TrainState) -> None:
        """RUN/checkpoint/ (the engine's weights and optimizer, the RNG, phase and state) replaced
        whole: written beside, then renamed over the old one, which stays until the new one is complete."""
        final, tmp = self.checkpoint_dir, self.checkpoint_dir.with_name("checkpoint.tmp")
        with writing(final, partial=[tmp]):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            self.comm.barrier()
            self.engine.save(tmp, self.rank)
            weights = self.engine.weights()  # fp32, gathered: what the export and other readers take
            self.comm.barrier()
            if self.rank == 0:
                save_file(weights, str(tmp / "model.safetensors"))
                torch.save({"rng": torch.get_rng_state()}, tmp / "trainer.pt")
                atomic_write_json(tmp / "state.json", {"phase": self.phase, "state": state.to_dict()})
                fsync_tree(tmp)
        if self.rank == 0:
            replace_dir(tmp, final)
        self.comm.barrier()

    def resume(self) -> TrainState:
        """The checkpoint of this phase (weights, optimizer and RNG restored), or the phase's
        start; metrics rows past it (a killed launch's) are dropped."""
        ckpt, where = self.checkpoint_dir, str(self.checkpoint_dir / "state.json")
        saved = json_object(ckpt / "state.json") if (ckpt / "state.json").exists() else None
        if saved is None or field_of(saved, "phase", str, where) != self.phase:  # none, or the search's
            state = TrainState(step=self.offset)
        else:
            state = TrainState.from_dict(field_of(saved, "state", dict, where), f"{where}: field 'state'")
            if not self.offset <= state.step <= self.phase_end:
                raise UserError(f"{where}: step {state.step} is outside the phase's steps {self.offset}..{self.phase_end}")
            try:
                self.engine.load(ckpt)
                torch.set_rng_state(torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)["rng"])
            except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
                raise UserError(f"{ckpt}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
            self.log(f"resumed from {ckpt} at step {state.step}")
        if self.phase == EFFICIENT and state.step == self.offset:
            state.elapsed = self.run.read_pruned_state()["state"].elapsed
        if self.rank == 0 and self.run.metrics.exists():
            self.run.truncate_metrics(state.step)
        return state

    def finish(self, state: TrainState) -> None:
        results, weights = self.last_results, self.engine.weights()
        if self.rank == 0:
            extra = {}
            if self.phase == EFFICIENT:
                info = self.run.read_pruned_state()
                extra = {"earlybird": {
                    "ticket_step": info["ticket_step"], "reason": info["reason"], "ticket": info["ticket"],
                    "weights": info["weights"], "heads": self.model.config.heads, "ffn": self.model.config.ffn,
                    "dense": info["dense"], "search_s": info["state"].elapsed,
                    "efficient_s": state.elapsed - info["state"].elapsed}}
            save(self.model, self.task, self.run.final, self.s.model, weights)
            summary = {"task": self.task.name, "model": str(self.s.model), "metrics": list(self.task.metrics),
                       "results": results, "steps": state.step, "train_examples": len(self.task.train),
                       "elapsed_s": state.elapsed, "phase": self.phase, **extra}
            atomic_write_json(self.run.path / "results.json", summary)
            self.metrics.summary(**{f"{d}/{k}": v for d, r in results.items() for k, v in r.items()})
            self.metrics.finish()
            self.log(f"done: {self.run.path / 'results.json'}, {self.run.final}")
        self.comm.barrier()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer  # heavy: only fine-tuning needs it
    importlib.import_module("pipeline.modeling_earlybert")  # registers model_type earlybert: the tokenizer reads the config
    if not any((model_dir / n).exists() for n in ("tokenizer.json", "vocab.txt")):
        raise UserError(f"{model_dir}: no tokenizer (tokenizer.json or vocab.txt) beside the model")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise UserError(f"{model_dir}: the tokenizer cannot be loaded ({type(e).__name__}: {str(e)[:200]})") from None


@exit_on_user_error
def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    s, search = parse_args(argv)
    if (s.out / "results.json").exists() and (s.out / "final").is_dir():
        recorded = RunDir(s.out).read_identity()
        if recorded is not None and recorded.get("finetune") == s.identity():
            print(f"{s.out}: finished; nothing to do", file=sys.stderr)
            return 0
    rank, world, device = setup()
    return Finetune(s, search, rank, world, device).run_all()


if __name__ == "__main__":
    sys.exit(main())
