"""Setting a launch up without writing to RUN: the process group, the DeepSpeed config, the data
check, the model and the DeepSpeed engine; and reading full fp32 weights back out of the engine."""
from __future__ import annotations

import os
from pathlib import Path

import deepspeed
import torch
from deepspeed.comm.torch import build_shm_op
from deepspeed.utils import safe_get_full_fp32_param

from data_prep.manifest import load_manifest, verify
from pipeline.dist import free_port
from pipeline.errors import UserError
from pipeline.hf import load_pretrained
from pipeline.model import PRESETS, BertConfig, BertForMLM, LayerNames, is_gate
from pipeline.optim import make_optimizer
from pipeline.settings import SearchSettings, TrainSettings, check_value, field_of, json_object
from pipeline.trusted import trust_checkpoints


def build_ops() -> None:
    """Compiles the op deepspeed.init_distributed JIT-compiles on first use, once per machine (torch's
    extension cache): the shared-memory collectives on CPU (about 40 s on 2 cores), nothing on CUDA.
    pipeline.experiment calls it before the first arm, whose wall clock would otherwise carry it."""
    build_shm_op()


def setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain `python -m pipeline.train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    cuda = torch.cuda.is_available()
    if cuda:  # before the process group: NCCL binds each rank to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return rank, world, device


def load_ds_config(path: Path, max_steps: int, world: int) -> dict:
    """The DeepSpeed config, total_num_steps "auto" and train_batch_size filled in. Not JSON, or a
    key the trainer itself reads of the wrong type: UserError naming the file (the rest is for
    DeepSpeed to check, in make_engine)."""
    where = f"{path} (DeepSpeed config)"
    cfg = json_object(path, where)
    field_of(cfg, "train_micro_batch_size_per_gpu", int, where, low=1)
    field_of(cfg, "gradient_accumulation_steps", int, where, low=1, default=None)
    field_of(cfg, "gradient_clipping", float, where, low=0, default=None)
    for name in ("fp16", "bf16", "torch_autocast"):
        section = field_of(cfg, name, dict, where, default={})
        field_of(section, "enabled", bool, f"{where}: {name}", default=None)
    field_of(cfg.get("torch_autocast", {}), "dtype", str, f"{where}: torch_autocast", default=None)
    field_of(field_of(cfg, "zero_optimization", dict, where, default={}), "stage", int,
             f"{where}: zero_optimization", default=None)
    optimizer = field_of(cfg, "optimizer", dict, where, default={})
    field_of(optimizer, "type", str, f"{where}: optimizer", default=None)
    params = field_of(optimizer, "params", dict, f"{where}: optimizer", default={})
    for key in ("lr", "eps", "weight_decay"):
        field_of(params, key, float, f"{where}: optimizer params", low=0, default=None)
    field_of(params, "max_trust_ratio", (float, None), f"{where}: optimizer params", low=0, default=None)
    betas = field_of(params, "betas", list, f"{where}: optimizer params", default=None)
    if betas is not None and len(betas) != 2:
        raise UserError(f"{where}: optimizer params: betas has {len(betas)} values, expected 2")
    for i, beta in enumerate(betas or ()):
        check_value(beta, float, f"{where}: optimizer params: betas[{i}]", low=0, high=1)
    scheduler = field_of(cfg, "scheduler", dict, where, default={})
    field_of(scheduler, "type", str, f"{where}: scheduler", default=None)
    sched = field_of(scheduler, "params", dict, f"{where}: scheduler", default={})
    field_of(sched, "warmup_max_lr", float, f"{where}: scheduler params", low=0, default=None)
    if sched.get("total_num_steps") != "auto":
        field_of(sched, "total_num_steps", float, f"{where}: scheduler params", low=1, default=None)
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = max_steps
    cfg.setdefault("gradient_accumulation_steps", 1)
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world
    return cfg


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


def check_data(data: Path, rank: int) -> dict:
    """DATA's manifest, after every rank checked the shards' shapes (rank 0 also their hashes)."""
    manifest = load_manifest(data)
    problems = verify(data, checksums=rank == 0)
    if problems:
        raise UserError(f"{data}: " + "; ".join(problems[:5]))
    if manifest["splits"]["train"]["num_sequences"] == 0:
        raise UserError(f"{data}: the train split is empty")
    return manifest


def build_model(s: TrainSettings, search: SearchSettings, manifest: dict) -> BertForMLM:
    """The dense model (gated when searching): a preset, a JSON config or --init_from's weights."""
    over = {**s.dropout_overrides(), "gates": s.earlybird == "on"}
    try:
        if s.init_from is not None:
            model = load_pretrained(s.init_from, **over)
        elif s.model in PRESETS:
            model = BertForMLM(BertConfig.preset(s.model, vocab_size=manifest["vocab_size"], **over))
        elif s.model.endswith(".json"):
            model = BertForMLM(BertConfig.from_json(s.model, **over))
        else:
            raise UserError(f"--model {s.model}: not a preset ({', '.join(PRESETS)}) nor a .json config")
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"model: {e}")
    c = model.config
    if c.vocab_size != manifest["vocab_size"]:
        raise UserError(f"{s.data}/manifest.json: vocabulary of {manifest['vocab_size']} tokens, "
                        f"the model's is {c.vocab_size}")
    if manifest["seq_len"] > c.max_position_embeddings:
        raise UserError(f"{s.data}/manifest.json: seq_len {manifest['seq_len']} exceeds the model's "
                        f"{c.max_position_embeddings} positions")
    if s.earlybird == "on":
        search.check_model(c.heads)
    return model


def load_pruned(s: TrainSettings, directory: Path) -> BertForMLM:
    return load_pretrained(directory, **s.dropout_overrides())


def run_identity(s: TrainSettings, model: BertForMLM, manifest: dict, ds_cfg: dict,
                 search: SearchSettings | None) -> dict:
    """RUN/run.json: what makes this run this run (a relaunch with anything else is refused; see
    pipeline.stage.check_identity). `search`: the EarlyBERT settings, None for a dense run."""
    identity = {"model": model.config.to_dict(), "data": str(s.data.resolve()),
                "data_fingerprint": [manifest["splits"]["train"]["shards"][0]["sha256"], manifest["seq_len"]],
                "micro_batch": ds_cfg["train_micro_batch_size_per_gpu"],
                "gradient_accumulation": ds_cfg["gradient_accumulation_steps"], "seed": s.seed}
    if search is not None:
        identity["search"] = search.to_record()
    return identity


def make_engine(model: BertForMLM, s: TrainSettings, ds_cfg: dict, device: torch.device, gates_apart: bool = False):
    """The DeepSpeed engine around the model: attention path, optimizer (gates_apart: the gates in
    a parameter group of their own), torch.compile."""
    try:
        model.set_attention(s.attention)
    except ValueError as e:
        raise UserError(str(e))
    try:
        optimizer = make_optimizer(model, ds_cfg, device, gates_apart=gates_apart)
        # The gates' own LR (Trainer.set_lr): the peak the schedule rises to, else the optimizer's
        peak = ds_cfg.get("scheduler", {}).get("params", {}).get("warmup_max_lr", optimizer.defaults["lr"])
        for group in optimizer.param_groups:
            if group.get("gates"):
                group["peak_lr"] = float(peak)
    except ValueError as e:
        raise UserError(f"{s.deepspeed_config}: {e}")
    if s.compile:
        if ds_cfg.get("zero_optimization", {}).get("stage", 0) == 3:
            raise UserError(f"--compile: not with ZeRO-3 ({s.deepspeed_config}): its parameter "
                            "gathering hooks break the compiled graph; use ZeRO-1 or 2")
        model.compile()  # in place: parameter names, gates and state_dict stay as they are
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    except Exception as e:  # DeepSpeed raises assertion/validation/value errors for bad configs
        raise UserError(f"{s.deepspeed_config}: DeepSpeed rejected the config ({type(e).__name__}: {e})")
    trust_checkpoints(engine)  # loading a checkpoint from RUN cannot run code
    return engine


def full_weights(engine, gates_only: bool = False) -> dict[str, torch.Tensor]:
    """fp32 master weights gathered from every ZeRO partition (a collective: all ranks)."""
    full = {}
    for n, p in engine.module.named_parameters():
        if gates_only and not is_gate(n):
            continue
        t = safe_get_full_fp32_param(p)
        full[n] = (t if t is not None else p.detach()).float().cpu().clone()
    return full


def weights_finite(engine, comm) -> bool:
    """Whether every rank's weights are finite (a collective: all ranks). ZeRO-3: each rank checks
    its own partition (ds_tensor); the module's parameters there are empty placeholders."""
    params = [getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p for p in engine.module.parameters()]
    finite = torch.stack([torch.isfinite(t.detach()).all() for t in params if t is not None and t.numel()])
    return not comm.agree(not bool(finite.all()))


def gate_values(engine) -> tuple[list, list]:
    """|gate| arrays per layer, heads and FFN (a collective: all ranks)."""
    g = full_weights(engine, gates_only=True)
    layers = [LayerNames(i) for i in range(engine.module.config.num_layers)]
    return [g[n.head_gates].numpy() for n in layers], [g[n.ffn_gates].numpy() for n in layers]
