"""A command that runs out of disk space at a chosen write (a test's fault injection: the space
really runs out, on a small file system the test mounted; only the moment is chosen).

    python tests/fill_disk.py SITE[:N] FILLER train|build ARGS...

runs `python -m pipeline.train ARGS` or `python -m data_prep build ARGS`, and right before the
N-th (default first) write at SITE fills the file system holding FILLER by writing FILLER until
it is full. SITE: snapshot (a gate snapshot), checkpoint (DeepSpeed's checkpoint files), pruned
(RUN/pruned/), export (RUN/final/), shard (a data shard)."""
import errno
import functools
import sys

import deepspeed

import data_prep.build
import data_prep.__main__
import pipeline.run_dir
import pipeline.search
import pipeline.train

SITES = {  # site: (owner, attribute) of the function that writes it
    "snapshot": (pipeline.run_dir.RunDir, "write_snapshot"),
    "checkpoint": (deepspeed.DeepSpeedEngine, "save_checkpoint"),
    "pruned": (pipeline.search, "export"),
    "export": (pipeline.train, "export"),
    "shard": (data_prep.build, "_save_npy"),
}


def fill(path: str) -> None:
    """Write path until the file system is full (big blocks, then small ones for the rest)."""
    with open(path, "ab", buffering=0) as f:
        for block in (1 << 20, 1 << 12, 1 << 9):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise


def fill_before(fn, n: int, filler: str):
    calls = [0]

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            fill(filler)
        return fn(*args, **kwargs)
    return wrapped


site, _, nth = sys.argv[1].partition(":")
filler, command, args = sys.argv[2], sys.argv[3], sys.argv[4:]
owner, name = SITES[site]
setattr(owner, name, fill_before(getattr(owner, name), int(nth or 1), filler))
if command == "train":
    sys.exit(pipeline.train.main(args))
sys.exit(data_prep.__main__.main(["build", *args]))
