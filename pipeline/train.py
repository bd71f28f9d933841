"""BERT MLM pre-training with DeepSpeed, resumable from RUN at any moment.

    deepspeed pipeline/train.py --deepspeed_config ds_configs/X.json --data DATA --run_dir RUN
        --model PRESET|CONFIG.json --max_steps N [--seed 0] [--dropout P] [--checkpoint_every K]
        [--eval_every K] [--max_time SECONDS] [--init_from HF_DIR] [--wandb_project P ...]

Also under torchrun, or plain `python pipeline/train.py ...` (one process). Batch sizes,
precision, optimizer, scheduler and ZeRO stage come from the DeepSpeed config.

Exit codes: 0 done (or already finished); 2 bad input (nothing in RUN touched); 3 the loss
became NaN/inf (a checkpoint of the last good state was written); 75 stopped on SIGTERM/SIGUSR1
or --max_time after a checkpoint: run the same command again to continue.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED = 2, 3, 75


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
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    import deepspeed
    deepspeed.add_config_arguments(p)
    a = p.parse_args(argv)
    if a.deepspeed_config is None:
        p.error("--deepspeed_config is required")
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
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


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


def build_model(a, manifest: dict):
    from pipeline.hf import load_pretrained
    from pipeline.model import PRESETS, BertConfig, BertForMLM
    over = {} if a.dropout is None else {"dropout": a.dropout, "attention_dropout": a.dropout}
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
    return model


def run_identity(a, model, manifest: dict, ds_cfg: dict) -> dict:
    return {"model": model.config.to_dict(), "data": str(a.data.resolve()),
            "data_fingerprint": [manifest["splits"]["train"]["shards"][0]["sha256"], manifest["seq_len"]],
            "micro_batch": ds_cfg["train_micro_batch_size_per_gpu"],
            "gradient_accumulation": ds_cfg["gradient_accumulation_steps"], "seed": a.seed}


def make_optimizer(model, ds_cfg: dict, device):
    """AdamW from the config's optimizer block as a client torch optimizer (fused on CUDA,
    no DeepSpeed op to compile); other optimizers (LAMB) are left to DeepSpeed."""
    opt = ds_cfg.get("optimizer", {"type": "AdamW", "params": {}})
    params = dict(opt.get("params", {}))
    groups = model.param_groups(params.pop("weight_decay", 0.01))
    if opt.get("type", "").lower() != "adamw":
        return None, groups
    ds_cfg.pop("optimizer", None)
    kw = {"lr": params.get("lr", 1e-4), "betas": tuple(params.get("betas", (0.9, 0.999))),
          "eps": params.get("eps", 1e-8)}
    if device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(groups, **kw), None


def peak_flops(device, dtype) -> float:
    """Dense peak of the device for MFU: datasheet figures on known GPUs, else this CPU's
    measured matmul rate in the training dtype."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("A10", 125e12),
                            ("L4", 121e12), ("V100", 125e12)):
            if key in name:
                return tflops
        return 100e12
    n = 1024
    x, y = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x @ y
    t = time.perf_counter()
    for _ in range(5):
        x @ y
    return 5 * 2 * n ** 3 / (time.perf_counter() - t)


# ------------------------------------------------------------------ training

class Trainer:
    def __init__(self, a, rank: int, world: int, device):
        self.a, self.rank, self.world, self.device = a, rank, world, device
        self.stop_signal = 0

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    def main(self) -> int:
        import deepspeed
        from data_prep.reader import MaskingCollator, PackedDataset, ResumableSampler
        from pipeline.run_dir import RunDir

        a = self.a
        run = self.run = RunDir(a.run_dir)
        done = run.finished_step()
        if done is not None and done >= a.max_steps:
            self.log(f"{run.path}: finished at step {done}; nothing to do")
            return 0
        ds_cfg = load_ds_config(a.deepspeed_config, a.max_steps, self.world)
        manifest = check_data(a.data, self.rank)
        torch.manual_seed(a.seed)
        model = build_model(a, manifest)
        identity = run_identity(a, model, manifest, ds_cfg)
        recorded = run.read_json("run.json")
        if recorded is not None and recorded != identity:
            diff = sorted(k for k in identity if identity[k] != recorded.get(k))
            raise BadInput(f"{run.path}: belongs to a different run (differs in {', '.join(diff)}); "
                           "use a new --run_dir")
        optimizer, groups = make_optimizer(model, ds_cfg, self.device)
        try:
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   model_parameters=groups, config=ds_cfg)
        except Exception as e:  # DeepSpeed raises assertion/validation/value errors for bad configs
            raise BadInput(f"{a.deepspeed_config}: DeepSpeed rejected the config ({type(e).__name__}: {e})")
        self.engine = engine

        # From here on RUN is written.
        if self.rank == 0:
            run.checkpoints.mkdir(parents=True, exist_ok=True)
            if recorded is None:
                from data_prep.files import atomic_write_json
                atomic_write_json(run.path / "run.json", identity)
        torch.distributed.barrier()
        state = {"step": 0, "consumed": 0, "tokens": 0, "elapsed": 0.0}
        latest = run.latest_checkpoint()
        if latest is not None:
            _, client = engine.load_checkpoint(str(run.checkpoints), tag=latest["tag"])
            state.update(client["trainer"])
            self.log(f"resumed from {latest['tag']} (step {state['step']}, {state['consumed']} samples)")
        if self.rank == 0:
            run.truncate_metrics(state["step"])
        self.wandb = self._wandb(identity)

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
        self.pad = manifest["special_tokens"]["pad"]
        sampler = ResumableSampler(len(train), self.rank, self.world, a.seed, state["consumed"])
        micro, gas = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
        dtype = torch.bfloat16 if ds_cfg.get("bf16", {}).get("enabled") else \
            torch.float16 if ds_cfg.get("fp16", {}).get("enabled") else torch.float32
        flops_seq = model.flops_per_sequence(manifest["seq_len"], a.mlm_probability)
        peak = peak_flops(self.device, dtype) * self.world

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        t_start = time.time() - state["elapsed"]
        engine.train()
        exit_code = 0
        while state["step"] < a.max_steps:
            t0 = time.time()
            at_start = dict(state)
            loss_sum = torch.zeros(3, dtype=torch.float64)  # loss, non-pad tokens, finite flag
            for _ in range(gas):
                pos = sampler.consumed + self.rank * micro  # this micro batch's first global position
                idx = sampler.next_batch(micro)
                gen = torch.Generator().manual_seed(hash((a.seed, pos)) & 0x7FFFFFFFFFFFFFFF)
                batch = self.collate(*train.batch(idx), gen)
                loss, _, _ = engine(**{k: v.to(self.device) for k, v in batch.items()
                                       if k in ("input_ids", "segment_ids", "labels")})
                finite = torch.tensor(float(torch.isfinite(loss).item()), dtype=torch.float64)
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                if finite.item() < 1:
                    return self._nonfinite(at_start, loss)
                engine.backward(loss)
                engine.step()
                loss_sum += torch.tensor([loss.item() / gas, float(batch["attention_mask"].sum()), 0])
            torch.distributed.all_reduce(loss_sum)
            state["step"] += 1
            state["consumed"] = sampler.consumed
            state["tokens"] += int(loss_sum[1])
            dt = time.time() - t0
            state["elapsed"] = time.time() - t_start
            if state["step"] % a.log_every == 0 or state["step"] == a.max_steps:
                seqs = micro * gas * self.world
                self._log_row({"step": state["step"], "phase": "dense", "loss": loss_sum[0].item() / self.world,
                               "lr": engine.get_lr()[0], "tokens": state["tokens"], "step_time_s": dt,
                               "elapsed_s": state["elapsed"], "tokens_per_s": loss_sum[1].item() / dt,
                               "mfu": flops_seq * seqs / dt / peak, "samples": state["consumed"]})
            if a.eval_every and state["step"] % a.eval_every == 0 and state["step"] < a.max_steps:
                self.evaluate(state["step"])
            stop = self._agree(self.stop_signal)
            out_of_time = a.max_time is not None and self._agree(
                int(time.time() - t_start + 2 * dt + 10 > a.max_time))
            if state["step"] % a.checkpoint_every == 0 or stop or out_of_time or state["step"] == a.max_steps:
                self.checkpoint(state)
            if stop or out_of_time:
                self.log(f"stopped at step {state['step']} ({'signal' if stop else '--max_time'}); "
                         f"checkpointed: run the same command to continue (exit {EXIT_PREEMPTED})")
                exit_code = EXIT_PREEMPTED
                break
        if exit_code == 0:
            self.evaluate(state["step"])
            self.export(state["step"])
        if self.wandb is not None:
            self.wandb.finish()
        return exit_code

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = 1

    def _agree(self, flag: int) -> bool:
        t = torch.tensor(flag, dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def _nonfinite(self, at_start: dict, loss) -> int:
        self.log(f"error: the loss is {loss.item()} at step {at_start['step'] + 1}: stopping; the "
                 f"checkpoint holds the last good state (step {at_start['step']})")
        self.checkpoint(at_start)
        self._log_row({"step": at_start["step"] + 1, "phase": "dense", "loss": loss.item(),
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
            print(f"step {row['step']:>6}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                  f"{row.get('tokens_per_s', 0):,.0f} tok/s  mfu {row.get('mfu', 0):.1%}",
                  file=sys.stderr, flush=True)

    def _wandb(self, identity: dict):
        a = self.a
        if self.rank != 0 or a.wandb_project is None or (a.wandb_mode or os.environ.get("WANDB_MODE")) == "disabled":
            return None
        import wandb
        id_file = self.run.path / "wandb_id"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            from data_prep.files import atomic_write_bytes
            import secrets
            run_id = secrets.token_hex(6)
            atomic_write_bytes(id_file, run_id.encode())
        return wandb.init(project=a.wandb_project, group=a.wandb_group, entity=a.wandb_entity,
                          mode=a.wandb_mode, id=run_id, resume="allow", dir=str(self.run.path),
                          config={**vars(a), **identity, "deepspeed_config": str(a.deepspeed_config)})

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        """MLM loss and accuracy on the validation split, masked with a fixed seed."""
        n_val = min(len(self.val), self.a.eval_sequences)
        if n_val == 0:
            return
        self.engine.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        micro = self.engine.train_micro_batch_size_per_gpu()
        n_batches = math.ceil(n_val / (micro * self.world))
        for i in range(n_batches):  # every rank runs the same number of forwards (ZeRO-3)
            start = i * micro * self.world + self.rank * micro
            # Batch s holds sequences s..s+micro-1 masked with seed s, whatever the world size.
            idx = list(range(start, min(start + micro, n_val))) or [0]
            batch = self.collate(*self.val.batch(idx), torch.Generator().manual_seed(start))
            loss, n, correct = self.engine(**{k: v.to(self.device) for k, v in batch.items()
                                              if k in ("input_ids", "segment_ids", "labels")})
            if start < n_val:
                sums += torch.tensor([loss.item() * n, float(n), float(correct)])
        torch.distributed.all_reduce(sums)
        self.engine.train()
        if sums[1] > 0:
            self._log_row({"step": step, "phase": "dense", "val_loss": (sums[0] / sums[1]).item(),
                           "val_accuracy": (sums[2] / sums[1]).item()})

    def checkpoint(self, state: dict) -> None:
        tag = f"step-{state['step']:07d}"
        tmp = "tmp-" + tag
        self.engine.save_checkpoint(str(self.run.checkpoints), tag=tmp,
                                    client_state={"trainer": dict(state)}, save_latest=False)
        torch.distributed.barrier()
        if self.rank == 0:
            self.run.publish_checkpoint(tmp, tag, state["step"], self.a.keep_checkpoints)
        torch.distributed.barrier()

    def export(self, step: int) -> None:
        """RUN/final in Hugging Face format (fp32 master weights, gates folded), then finished.json."""
        from deepspeed.utils import safe_get_full_fp32_param
        from data_prep.files import atomic_write_json
        from pipeline.hf import export, folded_state_dict
        module = self.engine.module
        # fp32 master weights, gathered from every ZeRO partition (a collective: all ranks).
        full = {}
        for n, p in module.named_parameters():
            t = safe_get_full_fp32_param(p)
            full[n] = (t if t is not None else p.detach()).float().cpu()
        if self.rank == 0:
            manifest = json.loads((self.a.data / "manifest.json").read_text())
            export(module, self.run.final, self.a.data / manifest["tokenizer"],
                   folded_state_dict(module, full))
            atomic_write_json(self.run.path / "finished.json", {"step": step})
            self.log(f"exported {self.run.final}")
        torch.distributed.barrier()


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
