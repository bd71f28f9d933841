"""`python -m pipeline.finetune` end to end on a pruned export (per-layer sizes) with the trained
vocabulary of the test corpus: classification on real labeled sentences, SQuAD v2 and STS-B
regression in GLUE's layout; the result loads with transformers' Auto classes and computes what
ours computes; a stop and a SIGTERM resume bit-identically; bad input is refused before RUN exists."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli
from pipeline.earlybird import random_masks
from pipeline.finetune import main as finetune_main, search_length
from pipeline.hf import export
from pipeline.model import BertConfig, BertForMLM
from pipeline.prune import prune
from pipeline.task_model import from_pretrained, from_pruned
from pipeline.tasks import TaskArgs, load_task
from test_tasks import GLUE_ROWS, POLARITY, SENTENCES, squad_file, write_glue

FT = ("-m", "pipeline.finetune")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, small_data) -> Path:
    """bert-mini (4 layers of 4 heads) pruned to heads [4, 1, 3, 2] and 40 % of FFN neurons, with the
    test corpus's 1000-token WordPiece vocabulary."""
    torch.manual_seed(0)
    model = BertForMLM(BertConfig.preset("bert-mini", vocab_size=1000, gates=True))
    heads = [np.arange(4) < k for k in (4, 1, 3, 2)]
    ffn = random_masks([np.arange(1024) < 410] * 4, seed=1)
    out = tmp_path_factory.mktemp("pruned") / "model"
    export(prune(model, heads, ffn), out, small_data / "tokenizer")
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory, small_data) -> Path:
    """bert-mini (4 layers of 4 heads, FFN 1024) exported dense, with the test corpus's vocabulary."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("dense") / "model"
    export(BertForMLM(BertConfig.preset("bert-mini", vocab_size=1000)), out, small_data / "tokenizer")
    return out


@pytest.fixture(scope="module")
def polarity(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("polarity") / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": s, "label": ("neg", "pos")[y]}) + "\n"
                            for s, y in zip(SENTENCES, POLARITY)))
    return path


def classify_args(model, polarity, out, *extra, epochs=2) -> list[str]:
    return [str(a) for a in ("--model", model, "--task", f"jsonl:{polarity}", "--text_fields", "text",
                             "--label_field", "label", "--dev_fraction", "0.25", "--out", out, "--epochs", epochs,
                             "--batch_size", 16, "--max_seq_len", 32, "--lr", "1e-4", "--log_every", 1, *extra)]


def classify(model, polarity, out, *extra, epochs=2):
    return run_cli(*FT, *classify_args(model, polarity, out, *extra, epochs=epochs))


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# Runs in a fresh Python: RUN/final through the Auto class; prints its logits on the inputs.
AUTO_LOGITS = r"""
import json, sys, torch, transformers
auto, final, inputs = sys.argv[1:4]
m = getattr(transformers, auto).from_pretrained(final, trust_remote_code=True).eval()
x = torch.load(inputs)
with torch.no_grad():
    o = m(**x)
logits = torch.stack([o.start_logits, o.end_logits], -1) if hasattr(o, "start_logits") else o.logits
torch.save(logits, inputs + ".out")
print("REPORT", json.dumps({"class": type(m).__name__, "num_labels": m.config.num_labels,
                            "id2label": m.config.id2label, "problem_type": m.config.problem_type}))
"""


def same_as_auto_class(run: Path, model_dir: Path, task_spec: str, args: TaskArgs, auto: str) -> dict:
    """Our TaskModel (the checkpoint's weights, gates unfolded; an EarlyBERT run's: the ticket) and
    RUN/final through transformers' AUTO compute the same logits on the first dev examples."""
    from transformers import AutoTokenizer
    task = load_task(task_spec, args)
    ours = (from_pruned(run / "pruned", task) if (run / "pruned").exists() else from_pretrained(model_dir, task)).eval()
    ours.load_state_dict(load_file(str(run / "checkpoint" / "model.safetensors")))
    tok = AutoTokenizer.from_pretrained(str(run / "final"))
    dev = task.dev["dev"][:6]
    if task.kind == "squad":
        x = tok([e.question for e in dev], [e.context for e in dev], truncation="only_second", max_length=64,
                padding=True, return_tensors="pt")
    else:
        cols = list(zip(*(e.texts for e in dev)))
        x = tok(list(cols[0]), list(cols[1]) if len(cols) > 1 else None, truncation=True, max_length=32,
                padding=True, return_tensors="pt")
    x = {k: x[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    torch.save(x, run.parent / "inputs.pt")
    with torch.no_grad():
        logits = ours(**x)[1]
    logits = torch.stack(logits, -1) if task.kind == "squad" else logits
    r = subprocess.run([sys.executable, "-c", AUTO_LOGITS, auto, str(run / "final"), str(run.parent / "inputs.pt")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = torch.load(run.parent / "inputs.pt.out")
    theirs = theirs.squeeze(-1) if task.kind == "regression" else theirs
    assert (theirs - logits).abs().max() < 1e-4, (theirs - logits).abs().max()
    return json.loads(r.stdout.split("REPORT", 1)[1])


@pytest.fixture(scope="module")
def classified(tmp_path_factory, pruned, polarity) -> Path:
    """An unbroken fine-tuning of the pruned export on the movie-review sentences (2 epochs)."""
    run = tmp_path_factory.mktemp("classified") / "run"
    r = classify(pruned, polarity, run)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_finetune_a_pruned_export_on_real_sentences(classified, pruned, polarity):
    run = classified
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 2 * 10 and res["train_examples"] == 150
    assert set(res["results"]["dev"]) == {"accuracy", "f1"} and 0 <= res["results"]["dev"]["accuracy"] <= 1
    m = rows(run)
    assert [r["step"] for r in m if r["phase"] == "finetune"] == list(range(1, 21))
    assert [(r["step"], r["epoch"]) for r in m if r["phase"] == "eval"] == [(10, 1), (20, 2)]
    assert m[0]["loss"] > 0 and all(np.isfinite(r["loss"]) for r in m if "loss" in r)
    report = same_as_auto_class(run, pruned, f"jsonl:{polarity}",
                                TaskArgs(text_fields=("text",), label_field="label", dev_fraction=0.25),
                                "AutoModelForSequenceClassification")
    assert report["class"] == "EarlyBertForSequenceClassification"
    assert report["id2label"] == {"0": "neg", "1": "pos"} or report["id2label"] == {0: "neg", 1: "pos"}
    # a finished RUN: the same command exits at once; other settings are refused
    before = (run / "results.json").read_bytes()
    r = classify(pruned, polarity, run)
    assert r.returncode == 0 and "nothing to do" in r.stderr
    r = classify(pruned, polarity, run, epochs=3)
    assert r.returncode == 2 and "--epochs 2 -> 3" in r.stderr and (run / "results.json").read_bytes() == before


def test_finetune_stops_and_resumes_bit_identically(tmp_path, classified, pruned, polarity):
    unbroken = classified
    # a stop file: checkpoint after the first step (mid-epoch), exit 75, then the same command
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "stop").touch()
    r = classify(pruned, polarity, stopped)
    assert r.returncode == 75, r.stderr[-2000:]
    assert json.loads((stopped / "checkpoint" / "state.json").read_text())["state"]["step"] == 1
    assert not (stopped / "stop").exists() and not (stopped / "final").exists()
    assert classify(pruned, polarity, stopped).returncode == 0
    # SIGTERM at a moment the run chooses: once the first rows are logged
    termed = tmp_path / "termed"
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, *FT, "--model", str(pruned), "--task", f"jsonl:{polarity}", "--text_fields", "text",
           "--label_field", "label", "--dev_fraction", "0.25", "--out", str(termed), "--epochs", "2",
           "--batch_size", "16", "--max_seq_len", "32", "--lr", "1e-4", "--log_every", "1"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((termed / "metrics.jsonl").exists() and
                                          (termed / "metrics.jsonl").read_text().count("\n") >= 3):
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 75, err[-2000:]
    assert 3 <= json.loads((termed / "checkpoint" / "state.json").read_text())["state"]["step"] < 20
    assert subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, timeout=300).returncode == 0
    for run in (stopped, termed):
        assert (run / "final" / "model.safetensors").read_bytes() == (unbroken / "final" / "model.safetensors").read_bytes()
        strip = [{k: v for k, v in r.items() if k not in ("elapsed_s", "time")} for r in rows(run)]
        assert strip == [{k: v for k, v in r.items() if k not in ("elapsed_s", "time")} for r in rows(unbroken)]
        assert json.loads((run / "results.json").read_text())["results"] == \
            json.loads((unbroken / "results.json").read_text())["results"]


def test_finetune_squad_v2_and_stsb(tmp_path, pruned):
    squad_dir = tmp_path / "squad"
    squad_dir.mkdir()
    for name in ("train-v2.0.json", "dev-v2.0.json"):
        squad_file(squad_dir / name, True, "v2.0")
    r = run_cli(*FT, "--model", pruned, "--task", "squad:v2", "--data_dir", squad_dir, "--out", tmp_path / "qa",
                "--epochs", 1, "--batch_size", 8, "--max_seq_len", 64, "--doc_stride", 16)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "qa" / "results.json").read_text())["results"]["dev"]
    assert {"exact_match", "f1", "HasAns_f1", "NoAns_f1"} <= set(res)
    report = same_as_auto_class(tmp_path / "qa", pruned, "squad:v2", TaskArgs(data_dir=squad_dir),
                                "AutoModelForQuestionAnswering")
    assert report["class"] == "EarlyBertForQuestionAnswering"

    glue = write_glue(tmp_path / "glue", "stsb", GLUE_ROWS["stsb"], n=40)
    r = run_cli(*FT, "--model", pruned, "--task", "glue:stsb", "--data_dir", glue, "--out", tmp_path / "stsb",
                "--epochs", 1, "--batch_size", 8, "--max_seq_len", 32)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "stsb" / "results.json").read_text())["results"]["dev"]
    assert set(res) == {"pearson", "spearman"}
    report = same_as_auto_class(tmp_path / "stsb", pruned, "glue:stsb", TaskArgs(data_dir=glue),
                                "AutoModelForSequenceClassification")
    assert report["num_labels"] == 1 and report["problem_type"] == "regression"


def test_finetune_bad_input_is_refused_before_run_exists(tmp_path, pruned, polarity, capsys):
    run = tmp_path / "run"
    cases = [
        (("--task", "glue:sst5", "--data_dir", tmp_path), "unknown GLUE task"),
        (("--task", "glue:sst2", "--data_dir", tmp_path), "SST-2/train.tsv: missing"),
        (("--task", "nli:x"), "unknown task"),
        (("--task", f"jsonl:{polarity}", "--text_fields", "text", "--label_field", "label",
          "--dev", tmp_path / "dev.jsonl"), "dev.jsonl:2: label 'great' is not among the training labels"),
        (("--task", f"jsonl:{polarity}", "--text_fields", "body", "--label_field", "label", "--dev_fraction", "0.2"),
         "reviews.jsonl:1: no field 'body'"),
    ]
    (tmp_path / "dev.jsonl").write_text(json.dumps({"text": "fine", "label": "pos"}) + "\n" +
                                        json.dumps({"text": "fine", "label": "great"}) + "\n")
    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64}))
    (gpt / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    cases.append((("--model", gpt, "--task", f"jsonl:{polarity}", "--text_fields", "text", "--label_field", "label",
                   "--dev_fraction", "0.2"), "gpt2/config.json"))
    for args, message in cases:  # in-process: the command's main, as the CLI calls it
        capsys.readouterr()
        code = finetune_main([str(a) for a in ("--model", pruned, "--out", run, *args)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (args, err[-1500:])
        assert not run.exists()


def test_earlybert_fine_tuning_end_to_end(tmp_path, dense, polarity):
    """--earlybird on: gates and L1 over the first epoch's search, the ticket (1 of 4 heads and 40 %
    of FFN neurons pruned, rewound to the pre-trained weights), the ticket fine-tuned at twice the
    LR; the early-bird monitor watches it; a stop inside the search resumes bit-identically (and
    the unwatched run ends the same); --ticket random keeps the ticket's shape."""
    eb = ("--earlybird", "on", "--search_fraction", "1.0", "--ticket_epochs", "1")
    run = tmp_path / "eb"
    # the early-bird monitor watches this one, as in pre-training (the runs below go without it)
    monitor = subprocess.Popen([sys.executable, "-m", "pipeline.monitor", "--run_dir", str(run), "--poll", "0.1"],
                               cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE, text=True)
    try:
        r = classify(dense, polarity, run, *eb, epochs=1)
        assert r.returncode == 0, r.stderr[-3000:]
        _, err = monitor.communicate(timeout=120)
    finally:
        monitor.kill()
    assert monitor.returncode == 0 and "the pruned model is written; stopping" in err, err[-2000:]
    res = json.loads((run / "results.json").read_text())
    e = res["earlybird"]
    assert res["phase"] == "efficient" and e["heads"] == [3, 3, 3, 3] and e["weights"] == "rewind"
    assert all(f % 64 == 0 for f in e["ffn"]) and abs(sum(e["ffn"]) - 0.6 * 4096) <= 64
    assert 5 <= e["ticket_step"] <= 10 and e["search_s"] > 0 and e["efficient_s"] > 0
    m = rows(run)
    t = e["ticket_step"]
    assert [r["step"] for r in m if r["phase"] == "search"] == list(range(1, t + 1))
    assert all(r["gate_l1"] > 0 and r["loss"] < 1.5 for r in m if r["phase"] == "search")  # without the L1 term
    assert [r["step"] for r in m if r["phase"] == "efficient"] == list(range(t + 1, t + 11))
    lrs = {r["phase"]: max(x["lr"] for x in m if x["phase"] == r["phase"]) for r in m if "lr" in r}
    assert lrs["efficient"] == pytest.approx(2e-4) and lrs["search"] <= 1e-4
    assert [r["step"] for r in m if r["phase"] == "eval"] == [t + 10]
    assert len(list((run / "gates").glob("step-*.npz"))) == t
    watched = [json.loads(line) for line in (run / "earlybird" / "distances.jsonl").read_text().splitlines()]
    assert [w["step"] for w in watched] == list(range(1, t + 1))
    assert (run / "earlybird" / "pairwise_heads.png").exists()
    report = same_as_auto_class(run, dense, f"jsonl:{polarity}",
                                TaskArgs(text_fields=("text",), label_field="label", dev_fraction=0.25),
                                "AutoModelForSequenceClassification")
    assert report["class"] == "EarlyBertForSequenceClassification"

    stopped = tmp_path / "stopped"  # stopped at step 1, inside the search
    stopped.mkdir()
    (stopped / "stop").touch()
    assert classify(dense, polarity, stopped, *eb, epochs=1).returncode == 75
    assert classify(dense, polarity, stopped, *eb, epochs=1).returncode == 0
    assert (stopped / "final" / "model.safetensors").read_bytes() == (run / "final" / "model.safetensors").read_bytes()
    assert json.loads((stopped / "results.json").read_text())["results"] == res["results"]

    # killed once RUN/pruned/ is written: the relaunch fine-tunes the ticket from there, the same way
    relaunched = tmp_path / "relaunched"
    shutil.copytree(run, relaunched)
    for gone in ("checkpoint", "final", "results.json"):
        shutil.rmtree(relaunched / gone) if (relaunched / gone).is_dir() else (relaunched / gone).unlink()
    assert classify(dense, polarity, relaunched, *eb, epochs=1).returncode == 0
    assert (relaunched / "final" / "model.safetensors").read_bytes() == (run / "final" / "model.safetensors").read_bytes()
    assert [r["step"] for r in rows(relaunched)] == [r["step"] for r in m]

    rnd = tmp_path / "random"
    assert classify(dense, polarity, rnd, *eb, "--ticket", "random", epochs=1).returncode == 0
    a, b = (json.loads((d / "pruned" / "trainer_state.json").read_text()) for d in (run, rnd))
    assert b["ticket"] == "random" and b["ticket_step"] == a["ticket_step"]
    assert [sum(h) for h in a["heads"]] == [sum(h) for h in b["heads"]]
    assert [sum(f) for f in a["ffn"]] == [sum(f) for f in b["ffn"]] and a["ffn"] != b["ffn"]


def test_finetune_under_torchrun_and_deepspeed(tmp_path, pruned, polarity):
    """With dropout off, the processes and the engine change only the arithmetic's order: one
    process (plain PyTorch), DDP over two processes under torchrun, and DeepSpeed (ZeRO-2 of
    ds_configs/cpu.json) over two processes under the deepspeed launcher, stopped after its first
    step and resumed from its checkpoint, train the same model."""
    args = ("--dropout", "0", "--batch_size", 10)  # 150 training examples: 15 whole batches
    one = tmp_path / "one"
    r = classify(pruned, polarity, one, *args, epochs=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "plain PyTorch on 1 process(es)" in r.stderr
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    port = str(29500 + os.getpid() % 1000)
    ddp, ds = tmp_path / "ddp", tmp_path / "ds"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, *FT]
    r = subprocess.run([*torchrun, *classify_args(pruned, polarity, ddp, *args, epochs=1)], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "plain PyTorch (DDP) on 2 process(es)" in r.stderr
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", port,
                "pipeline/finetune.py"]
    cmd = [*launcher, *classify_args(pruned, polarity, ds, *args, "--deepspeed_config", "ds_configs/cpu.json",
                                     epochs=1)]
    ds.mkdir()
    (ds / "stop").touch()
    r = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 75, r.stderr[-3000:]
    assert json.loads((ds / "checkpoint" / "state.json").read_text())["state"]["step"] == 1
    assert sorted(p.name for p in (ds / "checkpoint" / "deepspeed").iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    r = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DeepSpeed (ds_configs/cpu.json: ZeRO-2, fp32) on 2 process(es)" in r.stderr
    assert "its optimizer block is not used" in r.stderr and "resumed from" in r.stderr
    ref = load_file(str(one / "final" / "model.safetensors"))
    ref_rows = [r for r in rows(one) if r["phase"] == "finetune"]
    for run in (ddp, ds):
        got = load_file(str(run / "final" / "model.safetensors"))
        assert got.keys() == ref.keys()
        assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-5, run  # measured: 6e-7
        got_rows = [r for r in rows(run) if r["phase"] == "finetune"]
        assert [r["step"] for r in got_rows] == [r["step"] for r in ref_rows] == list(range(1, 16))
        assert [r["loss"] for r in got_rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-4)


def test_search_length_has_a_floor_of_at_most_half_an_epoch():
    """The paper's 0.2 of the first epoch where an epoch has 250 steps or more; below that the
    search is raised to --search_floor_steps, or to half the epoch if that is less."""
    assert search_length(0.2, 50, 2105) == 421    # SST-2 at batch 32: the paper's fraction
    assert search_length(0.2, 50, 115) == 50      # MRPC
    assert search_length(0.2, 50, 78) == 39       # RTE: half its epoch
    assert search_length(0.2, 50, 19) == 10       # bench.finetune
    assert search_length(0.2, 0, 19) == 4         # --search_floor_steps 0: the fraction alone
    assert search_length(1.0, 50, 19) == 19       # a larger fraction is kept
    assert search_length(0.01, 0, 5) == 1
