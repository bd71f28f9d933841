"""Checkpoint loading that cannot run code from RUN.

DeepSpeed's TorchCheckpointEngine loads every checkpoint file with `torch.load(weights_only=False)`,
a full unpickler: whoever can write RUN/checkpoints could make every rank run code. The engine
here loads with `weights_only=True` (tensors, containers, numbers and strings only) plus the few
plain DeepSpeed classes its checkpoints hold, listed below. Unpickling an allow-listed class
calls no method of it but its constructor with stored values (an Enum, a dataclass) or sets its
attributes, so a file can hold only data. A file with anything else is refused, naming the file.
"""
from __future__ import annotations

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from pipeline.errors import UserError

# What DeepSpeed's ZeRO-1/2/3 and bf16 optimizers store besides tensors (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints of every ds_configs/ file):
# the loss scaler (a static one in fp32/bf16, the dynamic one in fp16), the ZeRO stage, and where
# each parameter's fragment lies in the flat partition.
DEEPSPEED_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class TrustedCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with loads restricted to data."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # pickle.UnpicklingError (refused), or a damaged file
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"{path}: refused to load this checkpoint file: it is damaged or holds "
                                f"more than tensors and plain data ({first})") from e


def trust_checkpoints(engine) -> None:
    """Make the engine load checkpoints through TrustedCheckpointEngine (saving is unchanged)."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise UserError(f"the DeepSpeed config selects the checkpoint engine {type(current).__name__}: "
                        "only the default (torch) one is supported, its loads restricted to data")
    current.__class__ = TrustedCheckpointEngine  # same state, one method replaced
