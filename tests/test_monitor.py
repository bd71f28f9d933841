"""The early-bird monitor on gate snapshots (no trainer): decision, record, plots, W&B offline,
restart after kill -9, bad input; ticket files; random tickets; the W&B dashboard view."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli, tree_bytes
from pipeline.earlybird import random_masks
from pipeline.errors import UserError
from pipeline.run_dir import RunDir, ticket_record

HEADS, FFN = [12, 12, 12], [64, 64, 64]


def make_run(path: Path, snapshots: range, wandb_id: str | None = None) -> RunDir:
    """A searching run's files as the trainer writes them; the gates' noise dies down over the
    steps, so the masks settle and the rule fires after min_steps."""
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"model": {"heads": HEADS, "ffn": FFN, "gates": True}}))
    (path / "search.json").write_text(json.dumps({"heads": HEADS, "ffn": FFN, "prune_heads": 4,
                                                  "prune_ffn": 0.3, "min_steps": 60, "snapshot_every": 10}))
    if wandb_id:
        (path / "wandb.json").write_text(json.dumps({"id": wandb_id, "project": "earlybert-test",
                                                     "entity": None, "group": "g", "mode": "offline"}))
    add_snapshots(path, snapshots)
    return RunDir(path)


def add_snapshots(path: Path, steps, checkpoint: bool = True) -> None:
    """Snapshots of these steps, then (checkpoint) a checkpoint at the last one, as the trainer
    leaves them: a ticket at a checkpointed step is one no resume discards."""
    base = np.random.default_rng(0)
    heads0 = [base.uniform(0.2, 1.0, n) for n in HEADS]
    ffn0 = [base.uniform(0.2, 1.0, n) for n in FFN]
    for s in steps:
        rng = np.random.default_rng(s)
        amp = 1.5 * np.exp(-s / 25)
        RunDir(path).write_snapshot(s, [h + amp * rng.normal(size=len(h)) for h in heads0],
                       [f + amp * rng.normal(size=len(f)) for f in ffn0])
    if checkpoint and steps:
        checkpoint_at(path, max(steps))


def checkpoint_at(path: Path, step: int) -> None:
    """RUN/checkpoints/latest.json naming a checkpoint of `step` (its content is not read here)."""
    tag = f"step-{step:07d}"
    (path / "checkpoints" / tag).mkdir(parents=True, exist_ok=True)
    (path / "checkpoints" / "latest.json").write_text(json.dumps({"tag": tag, "step": step, "phase": "search"}))


def monitor(run: Path, *extra, **kw) -> subprocess.CompletedProcess:
    return run_cli("-m", "pipeline.monitor", "--run_dir", run, "--poll", "0.1", *extra, timeout=120, **kw)


def test_monitor_draws_the_ticket_and_a_restart_agrees(tmp_path):
    ref = make_run(tmp_path / "ref", range(10, 310, 10), wandb_id="abc123")
    r = monitor(ref.path, env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-2000:]
    ticket = json.loads(ref.ticket.read_text())
    assert ticket["source"] == "monitor" and ticket["reason"].startswith("early-bird")
    assert 60 <= ticket["step"] < 300 and ticket["kept_heads"] == [8, 8, 8]
    assert sum(ticket["ffn_width"]) == 192 - round(0.3 * 192)
    rows = [json.loads(x) for x in (ref.earlybird / "distances.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == ticket["step"] and rows[-1]["fired"] == ticket["reason"]
    assert all(x["fired"] is None for x in rows[:-1])  # nothing after the ticket is read
    assert max(rows[-1]["heads_window_max"], rows[-1]["ffn_window_max"]) < 0.1
    assert rows[1]["heads_to_previous"] > 0.1  # the early masks do move
    for name in ("pairwise_heads", "pairwise_ffn", "distance_to_previous", "ticket_shape", "gate_histograms"):
        assert (ref.earlybird / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    ref.read_ticket(HEADS, FFN)  # what the trainer accepts
    # W&B (offline): a run of its own, id tied to the trainer's, with the heat maps as images.
    [wb] = list((ref.earlybird / "wandb").glob("offline-run-*-abc123-earlybird"))
    assert list(wb.glob("files/media/images/earlybird/pairwise_heads*.png"))

    # Killed while the trainer is still writing snapshots, restarted: the same decision.
    run = make_run(tmp_path / "run", range(10, 60, 10))
    p = subprocess.Popen([sys.executable, "-m", "pipeline.monitor", "--run_dir", str(run.path), "--poll", "0.1"],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.DEVNULL)
    distances = run.earlybird / "distances.jsonl"
    deadline = time.time() + 60
    while not (distances.exists() and len(distances.read_text().splitlines()) == 5):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not run.ticket.exists()
    add_snapshots(run.path, range(60, 310, 10))
    r = monitor(run.path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert run.ticket.read_text() == ref.ticket.read_text()
    assert distances.read_text() == (ref.earlybird / "distances.jsonl").read_text()
    # Started again after the ticket: it rebuilds the record and leaves the ticket alone.
    r = monitor(run.path)
    assert r.returncode == 0 and "is drawn" in r.stderr
    assert run.ticket.read_text() == ref.ticket.read_text()


def test_monitor_watches_on_past_a_ticket_a_resume_may_discard(tmp_path):
    """A relaunch finds the ticket and snapshots of a trajectory killed after its last checkpoint
    (step 30): the monitor does not stop on that ticket; the trainer's resume drops them, trains
    the steps again, and the monitor follows the new snapshots to the new ticket."""
    ref = make_run(tmp_path / "ref", range(10, 310, 10))
    assert monitor(ref.path).returncode == 0
    t = json.loads(ref.ticket.read_text())["step"]
    run = make_run(tmp_path / "run", range(10, t + 10, 10))
    checkpoint_at(run.path, 30)
    run.put_ticket(json.loads(ref.ticket.read_text()))  # the killed launch's ticket, past step 30
    p = subprocess.Popen([sys.executable, "-m", "pipeline.monitor", "--run_dir", str(run.path), "--poll", "0.05"],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    assert p.poll() is None  # still watching
    run.discard_after(30)  # what the relaunched trainer's Search.begin does
    add_snapshots(run.path, range(40, 310, 10))
    assert p.wait(timeout=60) == 0, p.stderr.read()[-2000:]
    assert "snapshots were replaced" in p.stderr.read()
    assert run.ticket.read_text() == ref.ticket.read_text()
    assert (run.earlybird / "distances.jsonl").read_text() == (ref.earlybird / "distances.jsonl").read_text()


def test_monitor_flags_override_the_trainer_settings(tmp_path):
    run = make_run(tmp_path / "run", range(10, 310, 10))
    r = monitor(run.path, "--prune_heads", "6", "--prune_ffn", "0.5", "--min_steps", "150")
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads(run.ticket.read_text())
    assert t["kept_heads"] == [6, 6, 6] and sum(t["ffn_width"]) == 96 and t["step"] >= 150


def test_monitor_ffn_multiple_from_search_json_and_flag(tmp_path):
    run = make_run(tmp_path / "run", range(10, 310, 10))
    search = json.loads((run.path / "search.json").read_text())
    (run.path / "search.json").write_text(json.dumps({**search, "ffn_multiple": 16}))
    r = monitor(run.path)
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads(run.ticket.read_text())
    # the global rule keeps 192 - 58 = 134; the nearest multiple of 16 is 128
    assert all(w % 16 == 0 for w in t["ffn_width"]) and sum(t["ffn_width"]) == 128
    rows = [json.loads(x) for x in (run.earlybird / "distances.jsonl").read_text().splitlines()]
    assert all(w % 16 == 0 for x in rows for w in x["ffn_width"])
    run.read_ticket(HEADS, FFN)
    # The flag overrides search.json (here 32 over its 16); without either it is 1 (tested above).
    run2 = make_run(tmp_path / "run2", range(10, 310, 10))
    (run2.path / "search.json").write_text(json.dumps({**search, "ffn_multiple": 16}))
    r = monitor(run2.path, "--ffn_multiple", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads(run2.ticket.read_text())
    assert all(w % 32 == 0 for w in t["ffn_width"]) and sum(t["ffn_width"]) == 128
    # A search.json value out of range is bad input, like a flag out of range.
    bad = make_run(tmp_path / "bad", range(10, 30, 10))
    (bad.path / "search.json").write_text(json.dumps({**search, "ffn_multiple": 0}))
    r = monitor(bad.path)
    assert r.returncode == 2 and "ffn_multiple 0" in r.stderr and "Traceback" not in r.stderr
    assert not bad.ticket.exists()


def test_monitor_bad_input(tmp_path):
    run = make_run(tmp_path / "run", range(10, 60, 10))
    snap = run.gates / "step-0000030.npz"
    snap.write_bytes(snap.read_bytes()[:200])  # truncated
    before = tree_bytes(run.path)
    r = monitor(run.path)
    assert r.returncode == 2 and str(snap) in r.stderr and "Traceback" not in r.stderr
    assert not run.ticket.exists()
    for name, data in before.items():
        assert (run.path / name).read_bytes() == data
    for flags, needle in ((["--prune_heads", "12"], "--prune_heads 12"), (["--prune_ffn", "1.5"], "--prune_ffn"),
                          (["--prune_heads", "-1"], "--prune_heads"), (["--window", "1"], "--window"),
                          (["--ffn_multiple", "0"], "--ffn_multiple 0")):
        fresh = make_run(tmp_path / f"flags{len(list(tmp_path.iterdir()))}", range(10, 30, 10))
        r = monitor(fresh.path, *flags)
        assert r.returncode == 2 and needle in r.stderr, (flags, r.stderr[-500:])
        assert not fresh.ticket.exists() and not fresh.earlybird.exists()


def test_ticket_files(tmp_path):
    run = make_run(tmp_path / "run", range(10, 20, 10))
    fp = run.fingerprint()
    heads = [np.array([1] * 8 + [0] * 4, dtype=bool)] * 3
    ffn = [np.ones(64, dtype=bool)] * 3
    first = run.publish_ticket(ticket_record(10, "early-bird", "monitor", fp, heads, ffn, []))
    second = run.publish_ticket(ticket_record(20, "fallback", "trainer", fp, heads, ffn, []))
    assert first == second and second["step"] == 10  # the first ticket in place wins
    assert run.read_ticket(HEADS, FFN)["heads"][0].sum() == 8
    cases = [("{not json", "not a valid ticket"),
             (json.dumps({**first, "run": "0123456789abcdef"}), "another run"),
             (json.dumps({**first, "heads": [[0] * 12] + first["heads"][1:]}), "every head of layer 0"),
             (json.dumps({**first, "ffn": first["ffn"][:2]}), "do not match"),
             (json.dumps({k: v for k, v in first.items() if k != "reason"}), "not a valid ticket")]
    for text, needle in cases:
        run.ticket.write_text(text)
        with pytest.raises(UserError, match=needle) as e:
            run.read_ticket(HEADS, FFN)
        assert str(run.ticket) in str(e.value)


def test_random_ticket_has_the_rule_tickets_shape():
    rng = np.random.default_rng(1)
    rule = [rng.random(n) < 0.6 for n in (64, 50, 80)]
    rand = random_masks(rule, seed=3)
    assert [m.sum() for m in rand] == [m.sum() for m in rule]
    assert [len(m) for m in rand] == [len(m) for m in rule]
    assert any((a != b).any() for a, b in zip(rand, rule))
    assert all((a == b).all() for a, b in zip(rand, random_masks(rule, seed=3)))  # seeded


def test_dashboard_view_has_the_earlybird_panels():
    r = run_cli("-m", "pipeline.dashboard", "--entity", "me", "--project", "bert", "--dry_run")
    assert r.returncode == 0, r.stderr[-2000:]
    view = json.loads(r.stdout)
    assert view["entity"] == "me" and view["project"] == "bert"
    sections = {s["name"]: s["panels"] for s in view["spec"]["section"]["panel_bank_config"]["sections"]}
    assert list(sections) == ["Training", "Early-bird search", "Ticket convergence (pairwise mask distances)"]
    metrics = {m for s in sections.values() for p in s for m in p["config"].get("metrics") or []}
    assert {"loss", "lr", "tokens_per_s", "val_loss", "earlybird/heads_to_previous",
            "earlybird/ffn_to_previous"} <= metrics
    regex = {p["config"].get("metric_regex") for s in sections.values() for p in s}
    assert "earlybird/kept_heads/layer_.*" in regex and "earlybird/ffn_width/layer_.*" in regex
    media = {k for s in sections.values() for p in s for k in p["config"].get("media_keys") or []}
    assert {"earlybird/pairwise_heads", "earlybird/pairwise_ffn", "earlybird/head_gates"} <= media
