"""pipeline/train.py end to end on CPU: ZeRO 1/2/3 with 1 and 2 ranks in bf16, exact resume after
kill -9 (2 ranks, ZeRO-2, fp32), signals, the NaN guards (loss and gradients), export, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, tree_bytes
from data_prep.build import BuildArgs, build
from helpers import ds_config, env, metrics, run_train, steps, train_args, train_cmd, validation_loss


@pytest.mark.parametrize("stage,ranks", [(0, 2), (1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 2)])
def test_zero_stages_bf16(tmp_path, small_data, stage, ranks):
    cfg = ds_config(tmp_path, f"zero{stage}_bf16.json")
    if stage == 0:  # its torch autocast runs bf16 matmuls, ~100x slower on this CPU: DeepSpeed's
        c = json.loads(cfg.read_text())  # no-ZeRO path (all-reduce, clipping) in fp32 here; autocast
        del c["torch_autocast"]  # is tested in test_lamb.py and, on a GPU, in tests/gpu
        cfg.write_text(json.dumps(c))
    run = tmp_path / "run"
    launcher = "deepspeed" if (stage, ranks) == (2, 2) else "torchrun"
    r = run_train(train_cmd(ranks, launcher),
                  *train_args(cfg, small_data, run, max_steps=6, eval_every=3, checkpoint_every=3))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = steps(run)
    assert [x["step"] for x in rows] == [1, 2, 3, 4, 5, 6]
    assert all(x["phase"] == "search" and x["tokens_per_s"] > 0 for x in rows)  # gated (the default)
    assert rows[-1]["tokens"] == 6 * 4 * 2 * ranks * 64  # no padding in the train split here
    assert rows[-1]["samples"] == 6 * 4 * 2 * ranks
    vals = [x for x in metrics(run) if "val_loss" in x]
    assert [v["step"] for v in vals] == [3, 6] and 0 <= vals[-1]["val_accuracy"] <= 1
    assert rows[-1]["loss"] < rows[0]["loss"]
    # The export holds the trained weights: it reproduces the run's last validation loss.
    assert abs(validation_loss(run / "final", small_data) - vals[-1]["val_loss"]) < 0.05
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    hf = AutoModelForMaskedLM.from_pretrained(str(run / "final"))
    tok = AutoTokenizer.from_pretrained(str(run / "final"))
    out = hf(**tok(["the history of the world"], return_tensors="pt")).logits
    assert torch.isfinite(out).all() and out.shape[-1] == 1000
    again = run_train(train_cmd(1), *train_args(cfg, small_data, run, max_steps=6))
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_exact_resume_after_kill_two_ranks_zero2(tmp_path, small_data):
    cfg = ds_config(tmp_path, "cpu.json", train_micro_batch_size_per_gpu=16)
    common = dict(max_steps=24, dropout=0, checkpoint_every=4, eval_every=0)
    ref = tmp_path / "ref"
    r = run_train(train_cmd(2), *train_args(cfg, small_data, ref, **common))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "killed"
    p = subprocess.Popen([*train_cmd(2), *train_args(cfg, small_data, run, **common)], cwd=ROOT, env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(steps(run)) >= 10:
            break
        time.sleep(0.05)
    import psutil  # torchrun puts its workers in sessions of their own: kill the whole tree
    tree = [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    for pid in tree:
        os.kill(pid, signal.SIGKILL)  # launcher and both ranks, between checkpoints
    p.wait()
    time.sleep(0.5)
    assert 10 <= len(steps(run)) < 24 and not (run / "finished.json").exists()
    r = run_train(train_cmd(2), *train_args(cfg, small_data, run, **common))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step-00000" in r.stderr
    a, b = steps(ref), steps(run)
    assert [x["step"] for x in b] == list(range(1, 25))  # every step once
    for x, y in zip(a, b):
        assert x["samples"] == y["samples"] and x["lr"] == y["lr"] and x["tokens"] == y["tokens"]
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)


def test_sigterm_checkpoints_and_exits_75(tmp_path, small_data):
    cfg = ds_config(tmp_path, "cpu.json")
    run = tmp_path / "run"
    args = [*train_cmd(1), *train_args(cfg, small_data, run, max_steps=400, checkpoint_every=1000)]
    p = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    while not (run / "metrics.jsonl").exists() or len(steps(run)) < 3:
        time.sleep(0.2)
        assert p.poll() is None
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 75, err[-2000:]
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == steps(run)[-1]["step"] >= 3
    r = run_train(train_cmd(1), *train_args(cfg, small_data, run, max_steps=latest["step"] + 2))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["step"] for x in steps(run)] == list(range(1, latest["step"] + 3))
    # RUN/stop (how slurm/pretrain.sh relays Slurm's warning across nodes): one more step, then 75.
    (run / "stop").write_text("")
    r = run_train(train_cmd(1), *train_args(cfg, small_data, run, max_steps=400))
    assert r.returncode == 75 and "stop request" in r.stderr and not (run / "stop").exists()
    assert steps(run)[-1]["step"] == latest["step"] + 3
    # --max_time: stops with a checkpoint before the launch's budget runs out, start-up included;
    # the same command again gets a budget of its own (not one step and out: the time is per launch).
    timed = tmp_path / "timed"
    for launch in range(2):
        t0 = time.time()
        r = run_train(train_cmd(1), *train_args(cfg, small_data, timed, max_steps=10000, max_time=35,
                                                earlybird="off"))  # no ticket to end the launch early
        assert r.returncode == 75 and (timed / "checkpoints" / "latest.json").exists(), r.stderr[-2000:]
        assert time.time() - t0 < 35
        trained = [x["step"] for x in steps(timed)]
        assert len(trained) >= 2 * (launch + 1), trained  # each launch trained more than a step


def test_nonfinite_loss_stops_with_last_good_checkpoint(tmp_path, small_data):
    cfg = ds_config(tmp_path, "cpu.json", gradient_clipping=0.0)
    c = json.loads(cfg.read_text())
    c["optimizer"]["params"]["lr"] = c["scheduler"]["params"]["warmup_max_lr"] = 1e6
    c["scheduler"]["params"]["warmup_num_steps"] = 1
    cfg.write_text(json.dumps(c))
    run = tmp_path / "run"
    r = run_train(train_cmd(1), *train_args(cfg, small_data, run, max_steps=50, checkpoint_every=1000,
                                            earlybird="off"))
    assert r.returncode == 3, r.stderr[-2000:]
    assert "the loss is" in r.stderr and "at step" in r.stderr
    bad = metrics(run)[-1]
    assert bad["phase"] == "dense" and bad.get("nonfinite") and not torch.isfinite(torch.tensor(bad["loss"]))
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == bad["step"] - 1 and checkpointed_weights_finite(run)


def checkpointed_weights_finite(run) -> bool:
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    states = list((run / "checkpoints" / latest["tag"]).glob("*model_states.pt"))
    sd = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


@pytest.mark.parametrize("zero,first,last,needle", [(0, 4, 4, "the weights hold NaN/inf after step 4"),
                                                    (2, 4, 10 ** 6, "20 steps in a row had NaN/inf gradients")])
def test_nonfinite_gradients_are_never_checkpointed(tmp_path, small_data, zero, first, last, needle):
    """A NaN gradient with a finite loss (injected by tests/nan_gradient.py). Without ZeRO it
    reaches the weights: the step's own checkpoint is refused (exit 3) and latest.json keeps the
    step before. ZeRO-2 skips such steps; skipping for ever is stopped after 20 in a row."""
    cfg = ds_config(tmp_path, "cpu.json", zero_optimization={"stage": zero})
    run = tmp_path / "run"
    r = run_train([sys.executable, str(ROOT / "tests" / "nan_gradient.py"), str(first), str(last)],
                  *train_args(cfg, small_data, run, max_steps=40, checkpoint_every=1, earlybird="off"),
                  timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == first - 1 and checkpointed_weights_finite(run)
    # ZeRO-2 logs the step it gave up on; without ZeRO step 4 trained (finite loss) and is logged
    assert metrics(run)[-1].get("nonfinite", False) == (zero == 2)


def test_init_from_real_bert(tmp_path, bert_vocab):
    """--init_from a Hugging Face BERT directory, on data with that BERT's vocabulary."""
    data = tmp_path / "data"
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("The history of the world is long. " * 400)
    build(BuildArgs(out=data, sources=[f"text:{text}"], workers=1, val_fraction=0.0))
    cfg = ds_config(tmp_path, "cpu.json")
    r = run_train(train_cmd(1), *train_args(cfg, data, tmp_path / "run", model="bert-base",
                                            init_from=bert_vocab.parent, max_steps=2))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["num_hidden_layers"] == 6


# ------------------------------------------------------------------ bad input

def bad(tmp_path, small_data, data=None, cfg=None):
    r = run_train(train_cmd(1), *train_args(cfg or ds_config(tmp_path, "cpu.json"), data or small_data,
                                            tmp_path / "run", max_steps=2))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return r


def test_bad_data(tmp_path, small_data):
    r = bad(tmp_path, small_data, data=tmp_path / "nope")
    assert "nope" in r.stderr and not (tmp_path / "run").exists()
    import shutil
    corrupt = tmp_path / "corrupt"
    shutil.copytree(small_data, corrupt)
    shard = next((corrupt / "train").glob("*[0-9].npy"))
    b = bytearray(shard.read_bytes())
    b[-3] ^= 1
    shard.write_bytes(bytes(b))
    r = bad(tmp_path, small_data, data=corrupt)
    assert str(shard) in r.stderr and "sha256" in r.stderr and not (tmp_path / "run").exists()


def test_data_that_does_not_fit_the_model(tmp_path, small_data, bert_vocab):
    cfg = tmp_path / "short.json"
    cfg.write_text(json.dumps({"vocab_size": 1000, "hidden_size": 64, "heads": [2, 2], "ffn": [128, 96],
                               "head_size": 32, "max_position_embeddings": 32}))
    r = run_train(train_cmd(1), *train_args(ds_config(tmp_path, "cpu.json"), small_data, tmp_path / "run",
                                            model=cfg, max_steps=2))
    assert r.returncode == 2 and "seq_len 64" in r.stderr and not (tmp_path / "run").exists()
    r = run_train(train_cmd(1), *train_args(ds_config(tmp_path, "cpu.json"), small_data, tmp_path / "run",
                                            model="bert-base", init_from=bert_vocab.parent, max_steps=2))
    assert r.returncode == 2 and "vocabulary" in r.stderr and not (tmp_path / "run").exists()


def test_invalid_deepspeed_config(tmp_path, small_data):
    broken = tmp_path / "broken.json"
    broken.write_text('{"train_micro_batch_size_per_gpu": 4,')
    r = bad(tmp_path, small_data, cfg=broken)
    assert "broken.json" in r.stderr and not (tmp_path / "run").exists()
    wrong = ds_config(tmp_path, "cpu.json", zero_optimization={"stage": 7})
    r = bad(tmp_path, small_data, cfg=wrong)
    assert "DeepSpeed rejected" in r.stderr and not (tmp_path / "run").exists()


def test_run_dir_of_another_model(tmp_path, small_data):
    cfg = ds_config(tmp_path, "cpu.json")
    run = tmp_path / "run"
    r = run_train(train_cmd(1), *train_args(cfg, small_data, run, max_steps=1))
    assert r.returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    r = run_train(train_cmd(1), *train_args(cfg, small_data, run, model="bert-mini", max_steps=3))
    assert r.returncode == 2 and "different run" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


class RunsCode:
    """Unpickling this runs a shell command: what a full unpickler would do with a hostile file."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_file_cannot_run_code(tmp_path, small_data):
    """Checkpoints load with weights_only and an allow-list (pipeline/trusted.py): a model-states
    file that would run a command when unpickled is refused (exit 2, the file named), the command
    does not run, and RUN is left as it was."""
    cfg = ds_config(tmp_path, "cpu.json")
    run = tmp_path / "run"
    r = run_train(train_cmd(1), *train_args(cfg, small_data, run, max_steps=2, checkpoint_every=1,
                                            earlybird="off"))
    assert r.returncode == 0, r.stderr[-2000:]
    tag = json.loads((run / "checkpoints" / "latest.json").read_text())["tag"]
    target = next((run / "checkpoints" / tag).glob("*model_states.pt"))
    marker = tmp_path / "code-ran"
    state = torch.load(target, map_location="cpu", weights_only=False)
    state["buffer_names"] = RunsCode(marker)
    torch.save(state, target)
    before = tree_bytes(run)
    r = run_train(train_cmd(1), *train_args(cfg, small_data, run, max_steps=4, checkpoint_every=1,
                                            earlybird="off"))
    assert r.returncode == 2 and not marker.exists(), r.stderr[-2000:]
    assert "refused to load" in r.stderr and str(target) in r.stderr and "Traceback" not in r.stderr
    assert tree_bytes(run) == before


def test_wandb_offline_run_id_survives_a_resume(tmp_path, small_data):
    cfg = ds_config(tmp_path, "cpu.json")
    run = tmp_path / "run"
    common = dict(wandb_project="earlybert-test", wandb_mode="offline")
    # A W&B key in the environment is never printed nor written to RUN.
    secret = "0123456789abcdef0123456789abcdef01234567"
    r = subprocess.run([*train_cmd(1), *map(str, train_args(cfg, small_data, run, max_steps=2, **common))],
                       cwd=ROOT, env=dict(env(), WANDB_API_KEY=secret), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert secret not in r.stdout + r.stderr
    assert not [p for p, data in tree_bytes(run).items() if secret.encode() in data]
    run_id = json.loads((run / "wandb.json").read_text())["id"]
    r = run_train(train_cmd(1), *train_args(cfg, small_data, run, max_steps=4, **common))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "wandb.json").read_text())["id"] == run_id
    offline = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2  # both processes logged to the same W&B run id
    assert [x["step"] for x in steps(run)] == [1, 2, 3, 4]
