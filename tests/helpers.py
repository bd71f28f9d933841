"""What the test files share (they import this module and conftest's fixtures, never each other):
DeepSpeed configs sized for the CPU, the trainer's command line and environment, running it, and
reading what it wrote (metrics, the exported model's validation loss)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

TRAIN_MODULE = "pipeline.train"
# The deepspeed launcher takes a script path (it works because PYTHONPATH holds the repository).
TRAIN_SCRIPT = str(ROOT / "pipeline" / "train.py")


# ------------------------------------------------------------------ DeepSpeed configs

def ds_config(tmp_path: Path, base: str, **changes) -> Path:
    """ds_configs/BASE made small (micro batch 4 x 2 accumulation, 3 warm-up steps to lr 1e-3),
    with top-level keys replaced by CHANGES; written to TMP_PATH/ds_BASE."""
    cfg = json.loads((ROOT / "ds_configs" / base).read_text())
    cfg.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    cfg["scheduler"]["params"]["warmup_num_steps"] = 3
    cfg["optimizer"]["params"]["lr"] = cfg["scheduler"]["params"]["warmup_max_lr"] = 1e-3
    for k, v in changes.items():
        cfg[k] = v
    path = tmp_path / f"ds_{base}"
    path.write_text(json.dumps(cfg))
    return path


# ------------------------------------------------------------------ the trainer's command line

def train_args(cfg, data, run, *, model="bert-tiny", max_steps, **flags) -> list[str]:
    """The trainer's flags (also slurm/pretrain.sh's): --deepspeed_config CFG --data DATA
    --run_dir RUN --model MODEL --max_steps N, then --NAME VALUE for each keyword, in order."""
    named = {"deepspeed_config": cfg, "data": data, "run_dir": run, "model": model,
             "max_steps": max_steps, **flags}
    return [s for k, v in named.items() for s in (f"--{k}", str(v))]


def train_cmd(ranks: int = 1, launcher: str = "torchrun") -> list[str]:
    """The trainer in one process, or RANKS processes under torchrun or the deepspeed launcher."""
    if ranks == 1:
        return [sys.executable, "-m", TRAIN_MODULE]
    port = str(29500 + os.getpid() % 1000)
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
                "--master_port", port, TRAIN_SCRIPT]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_port", port, "-m", TRAIN_MODULE]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def pretrain_env(base: dict, log_dir: Path, **extra) -> dict:
    """The environment of `sbatch slurm/pretrain.sh` on a test cluster (BASE: the cluster's env):
    this Python, per-stage logs in LOG_DIR, no W&B, one thread per rank."""
    return dict(base, PYTHON=sys.executable, LOG_DIR=str(log_dir), WANDB_MODE="disabled",
                HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def run_train(cmd, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *map(str, args)], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------ what a run wrote

def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steps(run: Path) -> list[dict]:
    return [r for r in metrics(run) if "loss" in r]


def validation_loss(model_dir: Path, data: Path, micro: int = 4) -> float:
    """The trainer's validation loss, recomputed in fp32 from an exported model."""
    import torch

    from data_prep.reader import MaskingCollator, PackedDataset
    from pipeline.hf import load_pretrained
    m = json.loads((data / "manifest.json").read_text())
    model = load_pretrained(model_dir).eval()
    val = PackedDataset(data, "validation")
    collate = MaskingCollator(m["vocab_size"], m["special_tokens"])
    total = count = 0.0
    with torch.no_grad():
        for s in range(0, len(val), micro):
            b = collate(*val.batch(range(s, min(s + micro, len(val)))), torch.Generator().manual_seed(s))
            loss, n, _ = model(b["input_ids"], segment_ids=b["segment_ids"], labels=b["labels"])
            total, count = total + loss.item() * n, count + n
    return total / count
