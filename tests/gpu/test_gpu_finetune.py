"""pipeline/finetune.py on one CUDA device: a pruned export fine-tuned with plain PyTorch (bf16
autocast) and through DeepSpeed (ZeRO-2 and ZeRO-3 in bf16, stopped and resumed), EarlyBERT
fine-tuning to its ticket, and RUN/final through transformers' Auto class on the GPU. The task:
gensim's 200 real movie-review sentences (bench/gpu_prepare.sh writes them to GPU_DATA/polarity.jsonl)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpu_common import ROOT, gpu_data, needs_cuda  # noqa: F401 (gpu_data: a fixture)
from pipeline.earlybird import random_masks
from pipeline.hf import export
from pipeline.model import BertConfig, BertForMLM
from pipeline.prune import prune

pytestmark = [pytest.mark.gpu, needs_cuda]


@pytest.fixture(scope="module")
def polarity(gpu_data) -> Path:
    path = gpu_data / "polarity.jsonl"
    if not path.exists():
        pytest.skip(f"{path}: missing (run bench/gpu_prepare.sh)")
    return path


def bert_mini(tmp_path_factory, gpu_data, pruned: bool) -> Path:
    """bert-mini with bert-base-uncased's vocabulary; pruned: heads [4, 1, 3, 2], 40 % of FFN."""
    torch.manual_seed(0)
    model = BertForMLM(BertConfig.preset("bert-mini", vocab_size=30522, gates=pruned))
    if pruned:
        model = prune(model, [np.arange(4) < k for k in (4, 1, 3, 2)],
                      random_masks([np.arange(1024) < 410] * 4, seed=1))
    out = tmp_path_factory.mktemp("pruned" if pruned else "dense") / "model"
    export(model, out, gpu_data / "tokenizer")
    return out


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, gpu_data) -> Path:
    return bert_mini(tmp_path_factory, gpu_data, pruned=True)


@pytest.fixture(scope="module")
def dense(tmp_path_factory, gpu_data) -> Path:
    return bert_mini(tmp_path_factory, gpu_data, pruned=False)


def finetune(model: Path, polarity: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    args = [sys.executable, "-m", "pipeline.finetune", "--model", model, "--task", f"jsonl:{polarity}",
            "--text_fields", "text", "--label_field", "label", "--dev_fraction", "0.25", "--out", out,
            "--epochs", 2, "--batch_size", 16, "--max_seq_len", 64, "--lr", "1e-4", "--log_every", 1, *extra]
    r = subprocess.run(list(map(str, args)), cwd=ROOT, env=dict(os.environ, PYTHONPATH=path, WANDB_MODE="disabled"),
                       capture_output=True, text=True, timeout=300)
    print(r.stderr[-3000:])
    return r


def finite_run(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text())
    assert 0 <= res["results"]["dev"]["accuracy"] <= 1
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and all(math.isfinite(x) for x in losses)
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    return res


def test_plain_pytorch_bf16_and_the_auto_class(tmp_path, pruned, polarity):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    r = finetune(pruned, polarity, tmp_path / "run")
    assert r.returncode == 0 and "plain PyTorch on 1 process(es)" in r.stderr
    finite_run(tmp_path / "run")
    final = tmp_path / "run" / "final"
    m = AutoModelForSequenceClassification.from_pretrained(final, trust_remote_code=True).cuda().eval()
    assert type(m).__name__ == "EarlyBertForSequenceClassification"
    tok = AutoTokenizer.from_pretrained(final)
    texts = [json.loads(line)["text"] for line in polarity.read_text().splitlines()[:8]]
    with torch.no_grad():
        logits = m(**tok(texts, padding=True, return_tensors="pt").to("cuda")).logits
    assert logits.shape == (8, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("config,stage", [("zero2_bf16.json", 2), ("zero3_bf16.json", 3)])
def test_deepspeed_stops_and_resumes(tmp_path, pruned, polarity, config, stage):
    run = tmp_path / "run"
    run.mkdir()
    (run / "stop").touch()
    flags = ("--deepspeed_config", ROOT / "ds_configs" / config)
    r = finetune(pruned, polarity, run, *flags)
    assert r.returncode == 75 and (run / "checkpoint" / "deepspeed").is_dir()
    r = finetune(pruned, polarity, run, *flags)
    assert r.returncode == 0 and "resumed from" in r.stderr
    assert f"ZeRO-{stage}, bf16) on 1 process(es)" in r.stderr
    assert finite_run(run)["steps"] == 2 * 10  # 150 examples, 10 batches of up to 16


def test_earlybert_fine_tuning_to_its_ticket(tmp_path, dense, polarity):
    r = finetune(dense, polarity, tmp_path / "run", "--earlybird", "on", "--search_fraction", "0.5",
                 "--ticket_epochs", "1")
    assert r.returncode == 0
    e = finite_run(tmp_path / "run")["earlybird"]
    assert e["heads"] == [3, 3, 3, 3] and all(f % 64 == 0 for f in e["ffn"]) and e["ticket_step"] <= 5
