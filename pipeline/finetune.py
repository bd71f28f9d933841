"""Fine-tunes a pre-trained BERT (an export of this pipeline, dense or pruned, or a Hugging Face
BERT directory) on a task, and evaluates it with the task's official metrics after each epoch.

    python -m pipeline.finetune --model DIR --task TASK --out RUN [--data_dir DIR]
        [--epochs 3] [--lr 2e-5] [--batch_size 32] [--max_seq_len 128] [--seed 0] [--warmup 0.1]
        [--text_fields a[,b] --label_field y (--dev PATH | --dev_fraction F) [--task_type ...]]
        [--wandb_project P] [--wandb_mode ...]

TASK: glue:NAME (cola sst2 mrpc stsb qqp mnli qnli rte wnli, GLUE's layout in --data_dir),
squad:v1 / squad:v2 (train-v1.1.json, dev-v1.1.json, ... in --data_dir), csv:PATH, jsonl:PATH.
Plain PyTorch on one process, or DDP under torchrun (the batch is split over the processes).

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
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from data_prep.files import atomic_write_json, fsync_dir, fsync_tree

from . import task_metrics as tm
from .errors import UserError, exit_on_user_error, writing
from .metrics import Metrics
from .run_dir import RunDir
from .settings import FinetuneSettings, add_arguments, field_of, from_namespace, json_object
from .squad import decode, featurize
from .task_model import from_pretrained, save
from .tasks import REGRESSION, SQUAD, TaskArgs, load_task

EXIT_PREEMPTED = 75
METRICS = {"accuracy": tm.accuracy, "f1": tm.f1_binary, "matthews": tm.matthews, "pearson": tm.pearson,
           "spearman": tm.spearman}


@dataclass
class FinetuneState:
    """Where a fine-tuning stands: all of it is in RUN/checkpoint/state.json."""
    step: int = 0           # optimizer steps done (epoch = step // steps_per_epoch)
    elapsed: float = 0.0    # seconds of training and evaluation, over launches

    @classmethod
    def read(cls, path: Path) -> "FinetuneState":
        d = json_object(path)
        return cls(field_of(d, "step", int, str(path), low=0), field_of(d, "elapsed", float, str(path), low=0))


def parse_args(argv=None) -> FinetuneSettings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, FinetuneSettings)
    s = from_namespace(FinetuneSettings, p.parse_args(argv))
    try:
        s.check()
    except UserError as e:
        p.error(str(e))
    return s


def setup() -> tuple[int, int, torch.device]:
    """One process, or one of torchrun's (gloo on CPU, NCCL on GPUs)."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    return rank, world, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


class Finetune:
    def __init__(self, s: FinetuneSettings, rank: int, world: int, device: torch.device):
        """Reads and checks everything (task, model, tokenizer, RUN); writes nothing."""
        self.s, self.rank, self.world, self.device = s, rank, world, device
        self.run = RunDir(s.out)
        self.identity = {"finetune": s.identity()}
        recorded = self.run.path / "finetune.json"
        if recorded.exists() and json_object(recorded) != self.identity:
            raise UserError(f"{recorded}: RUN was started with other settings ({self._changed(json_object(recorded))}); "
                            "use another --out")
        if s.batch_size % world:
            raise UserError(f"--batch_size {s.batch_size}: must divide among the {world} processes")
        self.task = load_task(s.task, TaskArgs(s.data_dir, tuple(filter(None, (s.text_fields or "").split(","))),
                                               s.label_field, s.dev, s.dev_fraction, s.task_type, s.seed))
        torch.manual_seed(s.seed)
        self.model = from_pretrained(s.model, self.task).to(device)
        self.tokenizer = load_tokenizer(s.model)
        self.train_set = self.features(self.task.train, train=True)
        self.dev_sets = {name: (examples, self.features(examples, train=False))
                         for name, examples in self.task.dev.items()}
        n = len(self.train_set["input_ids"])
        self.steps_per_epoch = max(1, n // s.batch_size if world > 1 else math.ceil(n / s.batch_size))
        self.total_steps = s.epochs * self.steps_per_epoch
        decay = [p for name, p in self.model.named_parameters() if not _no_decay(name)]
        rest = [p for name, p in self.model.named_parameters() if _no_decay(name)]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}], lr=s.lr, eps=1e-8)
        self.net = self.model if world == 1 else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.metrics = Metrics(self.run, rank)
        self.stop_signal = False

    def _changed(self, recorded: dict) -> str:
        before, now = recorded.get("finetune", {}), self.identity["finetune"]
        return ", ".join(f"--{k} {before.get(k)!r} -> {now[k]!r}" for k in now if before.get(k) != now[k]) or "format"

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

    def batches(self, epoch: int, start: int):
        """This process's share of each global batch of EPOCH, from step START of it on; the
        order is a seeded permutation per epoch, so a resumed run sees what it would have."""
        n = len(self.train_set["input_ids"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.s.seed * 1000003 + epoch))
        for i in range(start, self.steps_per_epoch):
            idx = order[i * self.s.batch_size:(i + 1) * self.s.batch_size][self.rank::self.world]
            yield {k: v[idx].to(self.device) for k, v in self.train_set.items()}

    # -- the loop
    def run_all(self) -> int:
        s = self.s
        state = self.resume()
        self.start_run()
        t0, base = time.time(), state.elapsed
        print(f"{self.task.name}: {len(self.train_set['input_ids']):,} training examples, "
              f"{self.steps_per_epoch} steps per epoch x {s.epochs}, from step {state.step}", file=sys.stderr)
        for note in self.task.notes:
            print(note, file=sys.stderr)
        while state.step < self.total_steps:
            epoch, at = divmod(state.step, self.steps_per_epoch)
            for batch in self.batches(epoch, at):
                loss = self.train_step(batch, state.step)
                state.step += 1
                state.elapsed = base + time.time() - t0
                self.log_step(state, loss)
                if state.step % self.steps_per_epoch and self.stop_requested():  # an epoch's end: after its evaluation
                    return self.stop(state)
            self.evaluate(state, epoch + 1)
            state.elapsed = base + time.time() - t0
            self.checkpoint(state)
            if state.step < self.total_steps and self.stop_requested():
                return self.stop(state, checkpointed=True)
        self.finish(state)
        return 0

    def stop(self, state: FinetuneState, checkpointed: bool = False) -> int:
        if not checkpointed:
            self.checkpoint(state)
        if self.rank == 0:
            self.run.clear_stop()  # acted on: the next launch runs
        self.log(f"stopped at step {state.step}: run the same command to continue (exit {EXIT_PREEMPTED})")
        return EXIT_PREEMPTED

    def train_step(self, batch: dict, step: int) -> float:
        self.net.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss, _ = self.net(**batch)
        if not torch.isfinite(loss):
            raise UserError(f"step {step + 1}: the loss is {loss.item()} (lower --lr?)")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def lr_at(self, step: int) -> float:
        """Linear warm-up over --warmup of the steps, then linear decay to 0 (BERT's schedule)."""
        warm = int(self.s.warmup * self.total_steps)
        if step < warm:
            return self.s.lr * (step + 1) / warm
        return self.s.lr * max(0.0, (self.total_steps - step) / max(1, self.total_steps - warm))

    def log_step(self, state: FinetuneState, loss: float) -> None:
        if state.step % self.s.log_every and state.step != self.total_steps:
            return
        self.metrics.log({"step": state.step, "phase": "finetune", "loss": loss, "lr": self.lr_at(state.step - 1),
                          "epoch": state.step / self.steps_per_epoch, "elapsed_s": state.elapsed})
        self.log(f"step {state.step:>6}  loss {loss:.4f}  lr {self.lr_at(state.step - 1):.2e}")

    def stop_requested(self) -> bool:
        """SIGTERM/SIGUSR1 on any process, or the file RUN/stop."""
        asked = self.rank == 0 and self.run.stop_requested()
        flag = torch.tensor([float(self.stop_signal or asked)], device=self.device)
        if self.world > 1:
            dist.all_reduce(flag)
        return bool(flag.item())

    # -- evaluation
    @torch.no_grad()
    def evaluate(self, state: FinetuneState, epoch: int) -> dict[str, dict[str, float]]:
        """Every dev set's metrics (rank 0 computes them; the others wait)."""
        results = {}
        if self.rank == 0:
            self.model.eval()
            for name, (examples, f) in self.dev_sets.items():
                results[name] = self.dev_metrics(examples, f)
                self.metrics.log({"step": state.step, "phase": "eval", "epoch": epoch,
                                  **{f"{name}/{k}": v for k, v in results[name].items()}})
                self.log(f"epoch {epoch} {name}: " + "  ".join(f"{k} {v:.4f}" for k, v in results[name].items()))
        if self.world > 1:
            dist.barrier()
        self.last_results = results
        return results

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
    def start_run(self) -> None:
        if self.rank == 0:
            self.run.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run.path / "finetune.json", self.identity)
            self.metrics.start(self.s.wandb_project, self.s.wandb_entity, self.s.wandb_group, self.s.wandb_mode,
                               {**self.identity["finetune"], "task_kind": self.task.kind}, "finetune", "finetune")
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = True

    @property
    def checkpoint_dir(self) -> Path:
        return self.run.path / "checkpoint"

    def checkpoint(self, state: FinetuneState) -> None:
        """RUN/checkpoint/ (weights, optimizer, RNG, state) replaced whole: written beside, then
        renamed over the old one, which stays until the new one is complete."""
        if self.rank == 0:
            final, tmp, old = (self.checkpoint_dir.with_name(n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
            with writing(final, partial=[tmp]):
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                          str(tmp / "model.safetensors"))
                torch.save({"optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "trainer.pt")
                atomic_write_json(tmp / "state.json", asdict(state))
                fsync_tree(tmp)
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        if self.world > 1:
            dist.barrier()

    def resume(self) -> FinetuneState:
        """The checkpoint's state (weights, optimizer and RNG restored), or a fresh start; metrics
        rows past the checkpoint (a killed launch's) are dropped."""
        ckpt = self.checkpoint_dir
        if not (ckpt / "state.json").exists():
            if self.rank == 0 and self.run.metrics.exists():
                self.run.metrics.unlink()
            return FinetuneState()
        state = FinetuneState.read(ckpt / "state.json")
        if state.step > self.total_steps:
            raise UserError(f"{ckpt / 'state.json'}: step {state.step} is past the run's {self.total_steps} steps")
        try:
            weights = load_file(str(ckpt / "model.safetensors"))
            trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(trainer["optimizer"])
            torch.set_rng_state(trainer["rng"])
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            raise UserError(f"{ckpt}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
        if self.rank == 0:
            self.run.truncate_metrics(state.step)
        self.log(f"resumed from {ckpt} at step {state.step}")
        return state

    def finish(self, state: FinetuneState) -> None:
        results = getattr(self, "last_results", None) or {}
        if self.rank == 0:
            save(self.model, self.task, self.run.path / "final", self.s.model)
            summary = {"task": self.task.name, "model": str(self.s.model), "metrics": list(self.task.metrics),
                       "results": results, "steps": state.step, "epochs": self.s.epochs,
                       "train_examples": len(self.task.train), "elapsed_s": state.elapsed}
            atomic_write_json(self.run.path / "results.json", summary)
            self.metrics.summary(**{f"{d}/{k}": v for d, r in results.items() for k, v in r.items()})
            self.metrics.finish()
            self.log(f"done: {self.run.path / 'results.json'}, {self.run.path / 'final'}")
        if self.world > 1:
            dist.barrier()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)


def _no_decay(name: str) -> bool:
    return name.endswith(".bias") or "LayerNorm" in name or name.endswith("_gates")


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
    s = parse_args(argv)
    if (s.out / "results.json").exists() and (s.out / "final").is_dir():
        recorded = s.out / "finetune.json"
        if recorded.exists() and json_object(recorded) == {"finetune": s.identity()}:
            print(f"{s.out}: finished; nothing to do", file=sys.stderr)
            return 0
    rank, world, device = setup()
    return Finetune(s, rank, world, device).run_all()


if __name__ == "__main__":
    sys.exit(main())
