"""Crash consistency of what RUN publishes: a process killed after any file-system operation of a
checkpoint's publication or a model export leaves the last good copy loadable."""
import os
import shutil

import pytest

from pipeline.hf import export
from pipeline.model import BertConfig, BertForMLM
from pipeline.run_dir import RunDir


class Killed(BaseException):
    """Stands for SIGKILL: raised right after the n-th file-system operation completed."""


@pytest.fixture
def kill_after(monkeypatch):
    """kill_after(n): the n-th rename/replace/rmtree (counted from now) completes, then the process
    'dies'. Returns a function; calling it with None counts without killing."""
    state = {"left": None, "count": 0}

    def wrap(module, name):
        real = getattr(module, name)

        def op(*a, **k):
            out = real(*a, **k)
            state["count"] += 1
            if state["left"] is not None:
                state["left"] -= 1
                if state["left"] == 0:
                    raise Killed(f"after {name}{a}")
            return out
        monkeypatch.setattr(module, name, op)

    for module, name in ((os, "replace"), (os, "rename"), (shutil, "rmtree")):
        wrap(module, name)

    def arm(n):
        state["left"], state["count"] = n, 0
        return state
    return arm


def fake_checkpoint(run: RunDir, tmp_tag: str, content: str) -> None:
    d = run.checkpoints / tmp_tag
    d.mkdir(parents=True)
    (d / "model_states.pt").write_text(content)


def loadable(run: RunDir) -> str:
    info = run.latest_checkpoint()  # raises when latest.json names a missing directory
    return (run.checkpoints / info["tag"] / "model_states.pt").read_text()


def test_checkpointing_a_step_again_never_loses_the_last_good_one(tmp_path, kill_after):
    # The step a launch resumed from checkpointed again (the prune after a relaunch, the NaN guard
    # on the first step after a resume), killed after each operation of the publication in turn.
    counter = kill_after(None)
    ref = RunDir(tmp_path / "ref")
    fake_checkpoint(ref, "tmp-step-0000004", "first")
    ref.publish_checkpoint("tmp-step-0000004", "step-0000004", 4, 1, "search")
    counter = kill_after(None)
    fake_checkpoint(ref, "tmp-step-0000004", "again")
    ref.publish_checkpoint("tmp-step-0000004", "step-0000004", 4, 1, "search")
    operations = counter["count"]
    assert loadable(ref) == "again" and operations >= 2
    for n in range(1, operations + 1):
        run = RunDir(tmp_path / f"kill{n}")
        kill_after(None)
        fake_checkpoint(run, "tmp-step-0000004", "first")
        run.publish_checkpoint("tmp-step-0000004", "step-0000004", 4, 1, "search")
        fake_checkpoint(run, "tmp-step-0000004", "again")
        kill_after(n)
        with pytest.raises(Killed):
            run.publish_checkpoint("tmp-step-0000004", "step-0000004", 4, 1, "search")
        kill_after(None)
        assert loadable(run) in ("first", "again"), n
    # Older checkpoints beyond --keep_checkpoints go once the new one is in place.
    for step in (5, 6):
        fake_checkpoint(ref, f"tmp-step-{step:07d}", str(step))
        tag = ref.publish_checkpoint(f"tmp-step-{step:07d}", f"step-{step:07d}", step, 2, "search")
    assert tag == "step-0000006" and sorted(p.name for p in ref.checkpoints.iterdir()) == \
        ["latest.json", "step-0000005", "step-0000006"]


def test_an_export_killed_midway_leaves_a_complete_model(tmp_path, kill_after):
    model = BertForMLM(BertConfig.preset("bert-tiny", vocab_size=128))
    out = tmp_path / "final"
    kill_after(None)
    export(model, out, None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    counter = kill_after(None)
    export(model, out, None)
    operations = counter["count"]
    for n in range(1, operations + 1):
        kill_after(n)
        with pytest.raises(Killed):
            export(model, out, None)
        kill_after(None)
        # A complete copy is on disk: OUT itself, or OUT.old beside a complete OUT.tmp.
        copies = [d for d in (out, out.with_name("final.old")) if d.is_dir()]
        assert copies and all({p.name: p.read_bytes() for p in d.iterdir()} == before for d in copies[:1]), n
        export(model, out, None)  # the next launch's export puts OUT back
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert not out.with_name("final.old").exists() and not out.with_name("final.tmp").exists()
