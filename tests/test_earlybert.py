"""EarlyBERT end to end on CPU: ticket -> pruned model equivalence under ZeRO-1/2/3, random and
rewound tickets, the whole loop through slurm/pretrain.sh (monitor, relaunch, continuity, W&B,
export and reload, summary), and bad tickets and flags."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, tree_bytes
from helpers import ds_config, env, metrics, run_train, steps, train_args, train_cmd, validation_loss
from pipeline.run_dir import RunDir, ticket_record


def masked_gated_model(dense_config: dict, weights: dict, heads, ffn):
    """The dense gated model with the ticket's dropped heads and neurons gated to 0."""
    from pipeline.model import BertConfig, BertForMLM
    model = BertForMLM(BertConfig(**{**dense_config, "dropout": 0.0, "attention_dropout": 0.0}))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # The decoder's weight and bias are the word embeddings and cls.predictions.bias (tied).
    assert not unexpected and set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    with torch.no_grad():
        for layer, h, f in zip(model.bert.encoder.layer, heads, ffn):
            layer.attention.self.head_gates[~torch.tensor(h, dtype=torch.bool)] = 0.0
            layer.intermediate.ffn_gates[~torch.tensor(f, dtype=torch.bool)] = 0.0
    return model.eval()


@pytest.mark.parametrize("stage,ranks,ticket,weights", [(1, 1, "rule", "carry"), (2, 1, "random", "carry"),
                                                        (3, 2, "rule", "rewind")])
def test_ticket_to_pruned_model_under_zero(tmp_path, small_data, stage, ranks, ticket, weights):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from pipeline.hf import load_pretrained
    cfg = ds_config(tmp_path, "cpu.json", zero_optimization={"stage": stage})
    run = tmp_path / "run"
    r = run_train(train_cmd(ranks), *train_args(cfg, small_data, run, max_steps=8, search_max_steps=4,
                                                snapshot_every=2, prune_heads=1, l1=1e-2, ticket=ticket,
                                                ticket_weights=weights))
    # torchrun reports any non-zero worker exit as its own failure (1); slurm/pretrain.sh
    # therefore relaunches on the state of RUN, not only on the exit code.
    assert r.returncode == (76 if ranks == 1 else 1), r.stderr[-3000:]
    assert "exit 76" in r.stderr
    t = json.loads((run / "ticket.json").read_text())
    assert t["step"] == 4 and t["source"] == "trainer" and t["reason"].startswith("fallback")
    assert sorted(p.name for p in (run / "gates").iterdir()) == ["step-0000002.npz", "step-0000004.npz"]
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 4 and latest["phase"] == "search"
    state = json.loads((run / "pruned" / "trainer_state.json").read_text())
    assert state["state"]["step"] == 4 and state["state"]["consumed"] == 4 * 8 * ranks
    heads, ffn = state["heads"], state["ffn"]
    # The ticket's shape: the rule's per-layer counts, whatever the ticket kind.
    assert [sum(h) for h in heads] == t["kept_heads"] == [1, 1]
    # --ffn_multiple 64 (the default): the widths are multiples of 64 totalling the multiple of 64
    # nearest the paper's global count (717 of 1024 kept)
    assert [sum(f) for f in ffn] == t["ffn_width"] and all(w % 64 == 0 for w in t["ffn_width"])
    assert sum(t["ffn_width"]) == 64 * round((1024 - round(0.3 * 1024)) / 64)
    assert (heads == t["heads"] and ffn == t["ffn"]) == (ticket == "rule")
    dense = json.loads((run / "run.json").read_text())["model"]
    if weights == "carry":
        sd = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=latest["tag"])
    else:  # rewind: the weights before the search, gates all 1
        sd = load_file(str(run / "init.safetensors"))
        assert all((sd[k] == 1).all() for k in sd if k.endswith("_gates"))
    reference = masked_gated_model(dense, sd, heads, ffn)
    pruned = load_pretrained(run / "pruned").eval()
    assert pruned.config.heads == [1, 1] and pruned.config.ffn == t["ffn_width"] and not pruned.config.gates
    ids = torch.randint(5, 1000, (3, 64), generator=torch.Generator().manual_seed(0))
    seg = torch.zeros(3, 64, dtype=torch.int32)
    seg[:, 40:] = 1
    with torch.no_grad():
        diff = (reference(ids, segment_ids=seg) - pruned(ids, segment_ids=seg)).abs().max().item()
    assert diff < 1e-5


def scheduled_lrs(cfg_path, n: int) -> list[float]:
    """The LR the DeepSpeed config's schedule gives after each of n steps."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR
    p = json.loads(cfg_path.read_text())["scheduler"]["params"]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupDecayLR(opt, total_num_steps=n, **{k: v for k, v in p.items() if k != "total_num_steps"})
    out = []
    for _ in range(n):
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


def test_whole_loop_through_pretrain_sh(tmp_path, small_data):
    cfg = ds_config(tmp_path, "cpu.json")
    run = tmp_path / "run"
    e = dict(env(), WANDB_MODE="offline", MONITOR_FLAGS="--poll 0.2", PYTHON=sys.executable)
    pretrain = ["bash", str(ROOT / "slurm" / "pretrain.sh")]
    # The rule's own settings (epsilon 0.1, near-ties checked); an L1 100 x the paper's parts the
    # gates within a few dozen steps of bert-tiny (at 1e-4 a quarter of the FFN gates are still
    # near-ties of the boundary at step 50, and the rule rightly waits).
    r = subprocess.run([*pretrain, *train_args(cfg, small_data, run, max_steps=120, search_max_steps=100,
                                               search_min_steps=8, snapshot_every=2, l1=1e-2, eval_every=60,
                                               dropout=0, wandb_project="earlybert-test", wandb_mode="offline")],
                       cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    # The rule fired on its own, before the fallback: 5 snapshots within epsilon, at min_steps or
    # later, few near-ties; the monitor and the trainer apply it alike (either may write the
    # ticket), and it is taken at its snapshot's step.
    t = json.loads((run / "ticket.json").read_text())
    assert t["source"] in ("monitor", "trainer") and t["reason"].startswith("early-bird") and 10 <= t["step"] < 100, t
    state = json.loads((run / "pruned" / "trainer_state.json").read_text())
    taken = state["state"]["step"]
    assert state["ticket_step"] == t["step"] == taken
    record = [json.loads(x) for x in (run / "earlybird" / "distances.jsonl").read_text().splitlines()]
    assert [x["step"] for x in record] == list(range(2, taken + 1, 2))
    assert record[-1]["ffn_window_max"] < 0.1 and record[-1]["ffn_near_ties"] <= 0.1
    assert (run / "earlybird" / "pairwise_ffn.png").exists()
    # Continuity across the relaunch: every step once, the phase switch at the ticket, the data
    # stream and the LR schedule continuing by global step.
    rows = steps(run)
    assert [x["step"] for x in rows] == list(range(1, 121))
    assert [x["phase"] for x in rows] == ["search"] * taken + ["efficient"] * (120 - taken)
    assert [x["samples"] for x in rows] == [8 * s for s in range(1, 121)]
    assert [x["lr"] for x in rows] == pytest.approx(scheduled_lrs(cfg, 120), rel=1e-6, abs=1e-12)
    assert rows[taken]["loss"] < rows[0]["loss"]
    vals = [x for x in metrics(run) if "val_loss" in x]
    assert [v["step"] for v in vals] == [60, 120] and vals[-1]["phase"] == "efficient"
    # One W&B run across both launches, and the monitor's run beside it.
    run_id = json.loads((run / "wandb.json").read_text())["id"]
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert len(list((run / "earlybird" / "wandb").glob(f"offline-run-*-{run_id}-earlybird"))) == 1
    # The summary.
    for needle in (f"ticket:           step {taken}", "heads per layer:  [2, 2]", "FFN widths:", "parameters:",
                   "median step time: search", "efficient", "validation:       loss"):
        assert needle in r.stdout, r.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["parameters_pruned"] < summary["parameters_dense"] and summary["finished"] == 120
    # The export: the run's validation loss, and transformers loads it in a fresh process.
    assert abs(validation_loss(run / "final", small_data) - vals[-1]["val_loss"]) < 1e-3
    load = ("import sys, torch; from transformers import AutoModelForMaskedLM, AutoTokenizer; "
            "m = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval(); "
            "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "out = m(**t(['the history of the world'], return_tensors='pt')).logits; "
            "print(type(m).__name__, tuple(out.shape), bool(torch.isfinite(out).all()))")
    out = subprocess.run([sys.executable, "-c", load, str(run / "final")], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "EarlyBertForMaskedLM" and out.stdout.strip().endswith("1000) True")
    # Done: the same command returns at once.
    again = subprocess.run([*pretrain, *train_args(cfg, small_data, run, max_steps=120)],
                           cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_the_ticket_depends_on_the_snapshots_alone(tmp_path, small_data):
    """With or without the monitor, killed mid-search or not: the same ticket, taken at the same
    step, and the same pruned weights (CPU, fp32, dropout 0)."""
    cfg = ds_config(tmp_path, "cpu.json")
    flags = dict(max_steps=40, search_max_steps=30, search_min_steps=8, snapshot_every=2, epsilon=1.0,
                 checkpoint_every=3, eval_every=0, dropout=0)
    ref = tmp_path / "ref"  # no monitor, no interruption
    r = run_train(train_cmd(1), *train_args(cfg, small_data, ref, **flags))
    assert r.returncode == 76, r.stderr[-3000:]
    run = tmp_path / "run"  # a monitor beside it; the trainer killed after a checkpoint, mid-search
    (run / "gates").mkdir(parents=True)
    monitor = subprocess.Popen([sys.executable, "-m", "pipeline.monitor", "--run_dir", str(run), "--poll", "0.05"],
                               cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trainer = subprocess.Popen([*train_cmd(1), *train_args(cfg, small_data, run, **flags)], cwd=ROOT, env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while not (latest.exists() and json.loads(latest.read_text())["step"] >= 3) and trainer.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(trainer.pid, signal.SIGKILL)
    assert trainer.wait() == -signal.SIGKILL  # killed before the ticket's step (10)
    r = run_train(train_cmd(1), *train_args(cfg, small_data, run, **flags))
    assert r.returncode == 76, r.stderr[-3000:]
    monitor.wait(timeout=60)
    mine, theirs = (json.loads((d / "ticket.json").read_text()) for d in (run, ref))
    assert [mine[k] for k in ("step", "heads", "ffn")] == [theirs[k] for k in ("step", "heads", "ffn")]
    assert mine["step"] == 10
    for d in (run, ref):
        assert json.loads((d / "pruned" / "trainer_state.json").read_text())["state"]["step"] == 10
    assert (run / "pruned" / "model.safetensors").read_bytes() == (ref / "pruned" / "model.safetensors").read_bytes()


def test_trainer_refuses_bad_tickets_and_flags(tmp_path, small_data):
    cfg = ds_config(tmp_path, "cpu.json")
    run = tmp_path / "run"
    common = dict(max_steps=6, prune_heads=1, checkpoint_every=2, snapshot_every=2)
    # --max_time 1: stops after the first step, checkpointed
    r = run_train(train_cmd(1), *train_args(cfg, small_data, run, **common, max_time=1))
    assert r.returncode == 75, r.stderr[-2000:]
    # The search's settings are the run's while it searches: another --l1 or --epsilon is refused,
    # also for a run.json written before they were part of it (then RUN/search.json has them).
    old_format = tmp_path / "old-format"
    shutil.copytree(run, old_format)
    spec = json.loads((old_format / "run.json").read_text())
    assert spec.pop("search")["l1"] == 1e-4
    (old_format / "run.json").write_text(json.dumps(spec))
    for where, flags, needle in ((run, {"l1": 1e-3}, "--l1 0.001"), (run, {"epsilon": 0.2}, "--epsilon 0.2"),
                                 (old_format, {"l1": 1e-3}, "--l1 0.001")):
        before = tree_bytes(where)
        r = run_train(train_cmd(1), *train_args(cfg, small_data, where, **common, **flags))
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert tree_bytes(where) == before
    # A ticket file beside the run's: from another run, malformed, or emptying a layer.
    fp = RunDir(run).fingerprint()
    h = [np.array([True, False])] * 2
    f = [np.ones(512, dtype=bool)] * 2
    tickets = [(json.dumps(ticket_record(2, "x", "monitor", "another-run-0000", h, f, [])), "another run"),
               ('{"step": 2, "heads": [[1, 0]', "not a valid ticket"),
               (json.dumps(ticket_record(2, "x", "monitor", fp, [np.array([False, False])] * 2, f, [])),
                "every head of layer 0")]
    for text, needle in tickets:
        (run / "ticket.json").write_text(text)
        before = tree_bytes(run)
        r = run_train(train_cmd(1), *train_args(cfg, small_data, run, **common))
        assert r.returncode == 2 and needle in r.stderr and str(run / "ticket.json") in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        assert tree_bytes(run) == before  # nothing in RUN lost or rewritten
    # Flags out of range: refused before RUN is created.
    for flags, needle in (({"prune_heads": 2}, "--prune_heads 2"), ({"prune_ffn": 1.5}, "--prune_ffn 1.5"),
                          ({"prune_ffn": -0.1}, "--prune_ffn")):
        fresh = tmp_path / "fresh"
        r = run_train(train_cmd(1), *train_args(cfg, small_data, fresh, max_steps=2, **flags))
        assert r.returncode == 2 and needle in r.stderr and not fresh.exists(), r.stderr[-1000:]


# Runs in a fresh process: the trainer's own step on one global batch of 8 (micro batch 8 x 1
# accumulation step, or 4 x 2), its gate gradients read just before the optimizer applies them.
GATE_GRADIENTS = r"""
import json, sys, time, torch
from pipeline import train
from pipeline.engine import setup_distributed
from pipeline.run_dir import TrainState
out, args = sys.argv[1], json.loads(sys.argv[2])
rank, world, device = setup_distributed()
report = {}
for name, argv in args.items():
    t = train.Trainer(*train.parse_args(argv), rank, world, device)
    engine, grads = t.engine, {}
    step = engine.step
    def read_then_step():
        if engine.is_gradient_accumulation_boundary():
            grads["g"] = torch.cat([g.grad.detach().flatten().clone() for g in engine.module.gates()])
        step()
    engine.step = read_then_step
    loader = t.loader(TrainState())
    t.step(TrainState(), loader, time.time(), time.time(), 0.0)
    loader.close()
    report[name] = grads["g"].tolist()
json.dump(report, open(out, "w"))
"""


def test_l1_reaches_the_gates_once_whatever_the_accumulation(tmp_path, small_data):
    """The L1 term's gradient on every gate (all at 1 before the first step) is --l1, with 1 and
    with 2 accumulation steps at the same global batch: the MLM part is removed by the same step
    with --l1 0."""
    l1 = 0.01
    args = {}
    for micro, gas in ((8, 1), (4, 2)):
        (tmp_path / f"gas{gas}").mkdir()
        cfg = ds_config(tmp_path / f"gas{gas}", "cpu.json", train_micro_batch_size_per_gpu=micro,
                        gradient_accumulation_steps=gas, zero_optimization={"stage": 0})
        for coef in (l1, 0.0):
            args[f"{gas}-{coef}"] = train_args(cfg, small_data, tmp_path / f"run-{gas}-{coef}", max_steps=10,
                                               l1=coef, dropout=0, seed=3)
    r = subprocess.run([sys.executable, "-c", GATE_GRADIENTS, str(tmp_path / "grads.json"), json.dumps(args)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    g = {k: np.array(v) for k, v in json.loads((tmp_path / "grads.json").read_text()).items()}
    for gas in (1, 2):
        l1_part = g[f"{gas}-{l1}"] - g[f"{gas}-0.0"]
        assert np.allclose(l1_part, l1, rtol=1e-3, atol=1e-7), (gas, l1_part.min(), l1_part.max())
        assert np.abs(g[f"{gas}-0.0"]).max() > 1e-4  # the MLM part is there too (masks differ per micro batch)


def gate_drift(run) -> float:
    """The largest |1 - gate| of the run's last snapshot, heads and FFN together."""
    last = RunDir(run).snapshot_paths()[-1][1]
    with np.load(last) as z:
        return max(float(np.abs(1 - z[k]).max()) for k in z.files if k.startswith(("heads_", "ffn_")))


def test_gates_keep_the_peak_lr_through_a_long_warm_up(tmp_path, small_data):
    """--gate_lr peak (the default): while the model's LR warms up over 1,000 steps, the gates'
    group trains at the peak from the first step (logged as gate_lr) and moves far more than the
    schedule allows; --gate_lr schedule keeps them on the schedule. A search begun before the
    setting existed (no gate_lr in RUN/search.json and run.json) resumes with the schedule: its
    checkpoints hold two parameter groups."""
    cfg = json.loads(ds_config(tmp_path, "cpu.json").read_text())
    cfg["scheduler"]["params"]["warmup_num_steps"] = 1000
    cfg_path = tmp_path / "long_warmup.json"
    cfg_path.write_text(json.dumps(cfg))
    peak = cfg["scheduler"]["params"]["warmup_max_lr"]
    drift = {}
    for mode in ("peak", "schedule"):
        run = tmp_path / mode
        r = run_train(train_cmd(), *train_args(cfg_path, small_data, run, max_steps=400, gate_lr=mode,
                                               search_min_steps=2, search_max_steps=6, snapshot_every=2,
                                               checkpoint_every=3, eval_every=0))
        assert r.returncode == 76, r.stderr[-3000:]
        rows = steps(run)
        assert [x["step"] for x in rows] == list(range(1, 7))
        assert all(x["lr"] < peak / 100 for x in rows)  # the model's LR: still warming up
        assert all(x["gate_lr"] == (peak if mode == "peak" else x["lr"]) for x in rows), rows
        drift[mode] = gate_drift(run)
    warmup_sum = sum(x["lr"] for x in rows)
    assert drift["peak"] > 100 * warmup_sum and drift["peak"] > peak, drift
    assert drift["schedule"] < 10 * warmup_sum, (drift, warmup_sum)

    # The schedule run as one begun before --gate_lr: its records without the field, its ticket
    # undone, so the relaunch resumes the search from the step-6 checkpoint.
    run = RunDir(tmp_path / "schedule")
    for path, inner in ((run.search_json, None), (run.run_json, "search")):
        d = json.loads(path.read_text())
        del (d[inner] if inner else d)["gate_lr"]
        path.write_text(json.dumps(d))
    shutil.rmtree(run.pruned)
    run.ticket.unlink()
    r = run_train(train_cmd(), *train_args(cfg_path, small_data, run.path, max_steps=400, search_min_steps=2,
                                           search_max_steps=6, snapshot_every=2, checkpoint_every=3, eval_every=0))
    assert r.returncode == 76, r.stderr[-3000:]
    assert "resumed from" in r.stderr and run.pruned_ready()
