"""What the CUDA tests share (not a conftest.py: the tests import tests/conftest.py by name).

CUDA tests are marked `gpu` and skipped where no CUDA device is (CI). They import only what the
GPU check's machine has (torch, transformers, numpy, safetensors, pytest; DeepSpeed and its few
dependencies from bench/gpu_prepare.sh's wheels): no wandb, datasets, gensim, mwparserfromhell.
Data: GPU_DATA (default bench/gpu_data, made by bench/gpu_prepare.sh)."""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session")
def gpu_data() -> Path:
    data = Path(os.environ.get("GPU_DATA", ROOT / "bench" / "gpu_data"))
    if not (data / "manifest.json").exists():
        pytest.skip(f"{data}: no prepared data (run bench/gpu_prepare.sh)")
    return data
