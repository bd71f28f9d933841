"""Running out of disk space (exit 74) on a small tmpfs the test mounts (root only: skipped
otherwise): a gate snapshot, a checkpoint, the pruned model, the export and a data shard each
end with exit 74 and a message that says "no space left" and names the path; no partial output
is left behind; the last good checkpoint stays loadable; after the space is freed the same
command continues. tests/fill_disk.py fills the file system right before the chosen write."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli, tree_bytes
from helpers import ds_config, env, metrics, steps, train_args

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs at tmp_path/fs, unmounted afterwards (the run keeps up to 4 checkpoints of
    bert-tiny: 3 rotating, the one at the ticket)."""
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(fs)], check=True)
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def fill_run(site: str, filler, command: str, *args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "fill_disk.py"), site, str(filler), command,
                        *map(str, args)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    filler.unlink(missing_ok=True)  # the space is freed
    return r


def ran_out(r: subprocess.CompletedProcess, path) -> None:
    assert r.returncode == 74, r.stderr[-3000:]
    assert "no space left on device" in r.stderr and str(path) in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_out_of_space_at_each_write_of_the_loop(tmp_path, small_data, small_fs):
    cfg = ds_config(tmp_path, "cpu.json")
    run, filler = small_fs / "run", small_fs / "filler"
    flags = train_args(cfg, small_data, run, max_steps=10, search_max_steps=6, snapshot_every=2,
                       checkpoint_every=2, eval_every=0, dropout=0)
    # The first gate snapshot (step 2).
    ran_out(fill_run("snapshot", filler, "train", *flags), run / "gates" / "step-0000002.npz")
    assert not list((run / "gates").glob(".*tmp*"))
    # A checkpoint, with one already there (step 2): latest.json keeps naming it.
    ran_out(fill_run("checkpoint:2", filler, "train", *flags), run / "checkpoints" / "tmp-step-0000004")
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2 and not list((run / "checkpoints").glob("tmp-*"))
    # RUN/pruned/ at the ticket (the fallback at step 6): no partial copy; the dense state is
    # checkpointed, so the relaunch prunes at once.
    ran_out(fill_run("pruned", filler, "train", *flags), run / "pruned")
    assert not (run / "pruned").exists() and not (run / "pruned.tmp").exists()
    r = fill_run("export", filler, "train", *flags)  # the export is not reached: prune, exit 76
    assert r.returncode == 76, r.stderr[-3000:]
    # The export, after the efficient stage's last checkpoint (step 10).
    ran_out(fill_run("export", filler, "train", *flags), run / "final")
    assert not (run / "final").exists() and not (run / "final.tmp").exists()
    r = subprocess.run([sys.executable, "-m", "pipeline.train", *flags], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "final" / "model.safetensors").exists() and (run / "finished.json").exists()
    assert [x["step"] for x in steps(run)] == list(range(1, 11))
    assert [x["phase"] for x in steps(run)] == ["search"] * 6 + ["efficient"] * 4
    assert not any("nonfinite" in x for x in metrics(run))


def test_out_of_space_writing_a_data_shard(tmp_path, small_fs, bert_vocab):
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("The history of the world is long and it has many parts. " * 3000)
    (text / "b.txt").write_text("A second document, for the validation split. " * 300)
    # A given vocabulary: a trained one may break ties differently in each process
    args = ["--source", f"text:{text}", "--tokenizer", bert_vocab, "--seq-len", "32", "--workers", "1",
            "--val-fraction", "0.1", "--shard-size", "64"]
    out, filler = small_fs / "data", small_fs / "filler"
    ran_out(fill_run("shard:3", filler, "build", "--out", out, *args), out / ".work" / "final" / "train" / "00001.npy")
    r = run_cli("-m", "data_prep", "build", "--out", out, *args)  # the same command, space freed
    assert r.returncode == 0, r.stderr[-3000:]
    reference = tmp_path / "reference"
    r = run_cli("-m", "data_prep", "build", "--out", reference, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree_bytes(out) == tree_bytes(reference)
