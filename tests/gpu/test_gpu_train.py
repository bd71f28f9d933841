"""pipeline/train.py on one CUDA device: every shipped GPU config, fp16 overflow steps, torch.compile,
exact resume after kill -9, and the EarlyBERT loop through slurm/pretrain.sh."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpu_common import ROOT, gpu_data, needs_cuda  # noqa: F401 (gpu_data: a fixture)

pytestmark = [pytest.mark.gpu, needs_cuda]
GPU_CONFIGS = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json") if p.name != "cpu.json")


def ds_config(tmp_path: Path, base: str, **changes) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / base).read_text())
    cfg.update(train_micro_batch_size_per_gpu=16, gradient_accumulation_steps=2)
    sched = cfg["scheduler"]["params"]
    sched["warmup_num_steps"] = 4
    cfg["optimizer"]["params"]["lr"] = sched["warmup_max_lr"] = 1e-3
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    path = tmp_path / f"ds_{base}"
    path.write_text(json.dumps(cfg))
    return path


def env() -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, WANDB_MODE="disabled")


def train_args(cfg: Path, data: Path, run: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", "--deepspeed_config", str(cfg),
            "--data", str(data), "--run_dir", str(run), "--model", "bert-mini", "--eval_sequences", "64",
            *map(str, extra)]


def run(args, timeout=150) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    print(r.stderr[-3000:])
    return r


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps(run_dir: Path) -> list[dict]:
    return [r for r in rows(run_dir) if "loss" in r]


@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_shipped_config_trains(tmp_path, gpu_data, config):
    """A few search steps (gates, L1, a snapshot), the final evaluation and the export."""
    cfg = ds_config(tmp_path, config)
    r = run(train_args(cfg, gpu_data, tmp_path / "run", "--max_steps", 6, "--snapshot_every", 3))
    assert r.returncode == 0, r.stderr[-3000:]
    applied = [s for s in steps(tmp_path / "run") if not s.get("skipped")]
    assert [s["step"] for s in applied] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in applied)
    assert all(0 < s["mfu"] < 1 and s["data_wait_s"] >= 0 for s in applied)
    assert any("val_loss" in x for x in rows(tmp_path / "run"))
    assert (tmp_path / "run" / "gates" / "step-0000006.npz").exists()
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_fp16_overflow_steps_are_skipped(tmp_path, gpu_data):
    """A loss scale far too large: DeepSpeed skips the first steps; they are logged as skipped, do
    not count towards --max_steps, and the LR follows the steps actually taken."""
    cfg = ds_config(tmp_path, "zero2_fp16.json", fp16={"initial_scale_power": 24, "hysteresis": 1})
    r = run(train_args(cfg, gpu_data, tmp_path / "fp16", "--max_steps", 5, "--earlybird", "off"))
    assert r.returncode == 0, r.stderr[-3000:]
    logged = steps(tmp_path / "fp16")
    skipped = [s for s in logged if s.get("skipped")]
    applied = [s for s in logged if not s.get("skipped")]
    assert skipped, "a 2^24 loss scale should overflow at first"
    assert [s["step"] for s in applied] == list(range(1, 6))
    assert logged[-1]["samples"] == 16 * 2 * len(logged)  # skipped steps consumed their batches
    cfg_bf16 = ds_config(tmp_path, "zero2_bf16.json")
    r = run(train_args(cfg_bf16, gpu_data, tmp_path / "bf16", "--max_steps", 5, "--earlybird", "off"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s["lr"] for s in applied] == pytest.approx([s["lr"] for s in steps(tmp_path / "bf16")])


def test_compile_matches_eager(tmp_path, gpu_data):
    cfg = ds_config(tmp_path, "zero2_bf16.json")
    common = ("--max_steps", 4, "--dropout", 0, "--snapshot_every", 2)
    eager = run(train_args(cfg, gpu_data, tmp_path / "eager", *common))
    compiled = run(train_args(cfg, gpu_data, tmp_path / "compiled", *common, "--compile"))
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-3000:]
    a, b = steps(tmp_path / "eager"), steps(tmp_path / "compiled")
    assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], rel=3e-2)
    assert (tmp_path / "compiled" / "gates" / "step-0000004.npz").exists()


def test_resume_after_kill9(tmp_path, gpu_data):
    """Killed after its step-4 checkpoint, the run resumes: the same samples per step, losses
    within bf16 noise of an uninterrupted run."""
    cfg = ds_config(tmp_path, "zero2_bf16.json")
    common = ("--max_steps", 12, "--checkpoint_every", 4, "--dropout", 0, "--earlybird", "off")
    ref = subprocess.Popen(train_args(cfg, gpu_data, tmp_path / "ref", *common), cwd=ROOT, env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = subprocess.Popen(train_args(cfg, gpu_data, tmp_path / "kill", *common), cwd=ROOT, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = tmp_path / "kill" / "checkpoints" / "latest.json"
    deadline = time.time() + 150
    while time.time() < deadline and victim.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= 4 and len(steps(tmp_path / "kill")) >= 6:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    r = run(train_args(cfg, gpu_data, tmp_path / "kill", *common))
    assert r.returncode == 0, r.stderr[-3000:]
    assert ref.wait(timeout=150) == 0
    a, b = steps(tmp_path / "ref"), steps(tmp_path / "kill")
    assert [x["step"] for x in b] == list(range(1, 13))
    assert [x["samples"] for x in a] == [x["samples"] for x in b]
    assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], rel=2e-2)


def test_earlybert_loop(tmp_path, gpu_data):
    """slurm/pretrain.sh on the GPU: search with the monitor, ticket, prune, relaunch, export."""
    cfg = ds_config(tmp_path, "zero2_bf16.json")
    run_dir = tmp_path / "eb"
    args = ["bash", str(ROOT / "slurm" / "pretrain.sh"), "--deepspeed_config", str(cfg), "--data", str(gpu_data),
            "--run_dir", str(run_dir), "--model", "bert-mini", "--max_steps", "30", "--search_min_steps", "10",
            "--search_max_steps", "20", "--snapshot_every", "2", "--eval_sequences", "64", "--ffn_multiple", "64"]
    r = subprocess.run(args, cwd=ROOT, env=dict(env(), PYTHON=sys.executable, NPROC="1"), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ticket = json.loads((run_dir / "ticket.json").read_text())
    assert all(w % 64 == 0 for w in ticket["ffn_width"])
    phases = [s["phase"] for s in steps(run_dir)]
    taken = phases.index("efficient")
    assert set(phases[:taken]) == {"search"} and set(phases[taken:]) == {"efficient"}
    assert [s["step"] for s in steps(run_dir)] == list(range(1, 31))
    assert (run_dir / "summary.json").exists()
    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained(str(run_dir / "final"), trust_remote_code=True)
    ids = torch.randint(1000, 2000, (2, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()
