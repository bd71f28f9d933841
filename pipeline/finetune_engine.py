"""How fine-tuning applies an optimizer step: plain PyTorch (one process, or DDP under torchrun) or
DeepSpeed (--deepspeed_config: its precision, ZeRO stage and gradient clipping, on any launcher).
Both engines offer the same calls, so the loop in pipeline/finetune.py does not branch on which
one runs:

    engine.module                  the TaskModel (the search, evaluation and the export read it)
    engine.step(batch, lr, step)   forward, backward, clipping and the optimizer step: the global
                                   batch's loss (every process's share averaged; a collective)
    engine.weights()               the fp32 weights, ZeRO partitions gathered (a collective)
    engine.save(dir, rank)         the optimizer's state (a collective; the caller writes the weights)
    engine.load(dir)               the weights and the optimizer's state
    engine.close()                 frees what the engine holds (the search's, when the ticket starts)

Both run AdamW with fine-tuning's own --lr schedule and --weight_decay: a DeepSpeed config's
`optimizer` and `scheduler` blocks describe pre-training and are left out (a note says so), and
its batch keys are set from --batch_size (micro batch = --batch_size / processes, no accumulation).
"""
from __future__ import annotations

from pathlib import Path

import deepspeed
import torch
from safetensors.torch import load_file

from .dist import Comm
from .engine import full_weights, load_ds_config, training_dtype
from .errors import UserError
from .model import param_groups
from .trusted import trust_checkpoints

MAX_GRAD_NORM = 1.0  # BERT's fine-tuning clipping (plain PyTorch; DeepSpeed: the config's gradient_clipping)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """BERT's fine-tuning optimizer: no decay on biases, LayerNorm and gates."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, eps=1e-8)


def global_loss(loss: torch.Tensor, comm: Comm, world: int, step: int) -> torch.Tensor:
    """The global batch's loss (the mean of the processes' equal shares), checked on every
    process before backward, so a non-finite loss on one stops all of them alike."""
    total = loss.detach()
    if world > 1:
        total = comm.sum(comm.zeros(1).copy_(total.reshape(1)))[0] / world
    if not torch.isfinite(total):
        raise UserError(f"step {step + 1}: the loss is {total.item()} (lower --lr?)")
    return total


class TorchEngine:
    """AdamW and clipping at 1.0; DDP when there are several processes; bf16 autocast on CUDA."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, comm: Comm, world: int,
                 device: torch.device):
        self.module, self.comm, self.world, self.device = model.to(device), comm, world, device
        self.optimizer = adamw(model, lr, weight_decay)
        self.net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def describe(self) -> str:
        return "plain PyTorch" + (" (DDP)" if self.net is not self.module else "")

    def step(self, batch: dict, lr: float, step: int) -> torch.Tensor:
        self.net.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss, _ = self.net(**batch)
        total = global_loss(loss, self.comm, self.world, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def close(self) -> None:
        self.net = self.optimizer = None

    def weights(self) -> dict[str, torch.Tensor]:
        return full_weights(self)

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        self.module.load_state_dict(load_file(str(directory / "model.safetensors")))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))


def finetune_ds_config(path: Path, batch_size: int, world: int) -> tuple[dict, list[str]]:
    """PATH's DeepSpeed config for fine-tuning, and notes on what fine-tuning replaced in it."""
    cfg = load_ds_config(path, max_steps=1, world=world)  # the same checks as pre-training's
    notes = [f"{path}: its {k} block is not used: fine-tuning runs AdamW at --lr with its own schedule"
             for k in ("optimizer", "scheduler") if cfg.pop(k, None) is not None]
    micro = batch_size // world
    if (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) != (micro, 1):
        notes.append(f"{path}: micro batch {micro} per process and no accumulation (from --batch_size "
                     f"{batch_size} over {world} process(es)), not the config's "
                     f"{cfg['train_micro_batch_size_per_gpu']} x {cfg['gradient_accumulation_steps']}")
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, train_batch_size=batch_size)
    return cfg, notes


class DeepSpeedEngine:
    """DeepSpeed's engine around the model with fine-tuning's AdamW as its client optimizer."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, config: dict, source: Path,
                 comm: Comm, world: int, device: torch.device):
        self.source, self.config, self.comm, self.world = source, config, comm, world
        model.to(device)
        try:
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adamw(model, lr, weight_decay),
                                                        config=config)
        except Exception as e:  # DeepSpeed raises assertion/validation/value errors for bad configs
            raise UserError(f"{source}: DeepSpeed rejected the config ({type(e).__name__}: {e})") from None
        trust_checkpoints(self.engine)  # loading RUN/checkpoint cannot run code
        self.module = self.engine.module

    def describe(self) -> str:
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(training_dtype(self.config), "fp32")
        autocast = " autocast" if self.config.get("torch_autocast", {}).get("enabled") else ""
        return f"DeepSpeed ({self.source}: ZeRO-{self.engine.zero_optimization_stage()}, {precision}{autocast})"

    def step(self, batch: dict, lr: float, step: int) -> torch.Tensor:
        self.engine.train()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        loss, _ = self.engine(**batch)
        total = global_loss(loss, self.comm, self.world, step)
        self.engine.backward(loss)
        self.engine.step()
        return total

    def close(self) -> None:
        self.engine.destroy()
        self.engine = self.module = None

    def weights(self) -> dict[str, torch.Tensor]:
        return full_weights(self.engine)

    def save(self, directory: Path, rank: int) -> None:
        """DeepSpeed's checkpoint in DIR/deepspeed (every rank writes its partition)."""
        self.engine.save_checkpoint(str(directory), tag="deepspeed", save_latest=False)

    def load(self, directory: Path) -> None:
        try:
            path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed")
        except UserError:  # the data-only loader's refusal names the file
            raise
        except Exception as e:  # DeepSpeed asserts and raises its own types for a checkpoint it cannot use
            raise UserError(f"{directory / 'deepspeed'}: DeepSpeed cannot resume from it ({type(e).__name__}: "
                            f"{str(e)[:200]})") from None
        if path is None:
            raise UserError(f"{directory / 'deepspeed'}: no DeepSpeed checkpoint")
