"""Reading and verifying a data_prep output directory (OUT)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.settings import check_value, field_of, json_object

from .files import sha256_file

MAX_SIZE = 2 ** 24  # seq_len and vocab_size beyond it: not a real tokenizer's or model's (and a model that size
# would not fit in memory)
REQUIRED = ("format_version", "seq_len", "vocab_size", "tokenizer", "special_tokens", "splits")


def load_manifest(out: Path | str) -> dict:
    path = Path(out) / "manifest.json"
    if not path.exists():
        raise UserError(f"{path}: no manifest (not a data_prep output, or the build has not "
                        "finished: rerun its command)")
    m = json_object(path)
    missing = [k for k in REQUIRED if k not in m]
    if missing or not isinstance(m["splits"], dict) \
            or not all(s in m["splits"] for s in ("train", "validation")):
        raise UserError(f"{path}: not a data_prep manifest (missing {missing or 'splits'})")
    _check(m, str(path))
    return m


def _check(m: dict, where: str) -> None:
    """The types and ranges of what verify, the reader and the trainer take from a manifest."""
    field_of(m, "format_version", int, where)
    field_of(m, "seq_len", int, where, low=1, high=MAX_SIZE)
    vocab = field_of(m, "vocab_size", int, where, low=1, high=MAX_SIZE)  # the model's embedding rows
    _relative_path(field_of(m, "tokenizer", str, where), f"{where}: field 'tokenizer'")
    special = field_of(m, "special_tokens", dict, where)
    for name in ("pad", "mask"):
        field_of(special, name, int, f"{where}: field 'special_tokens'")
    for name, v in special.items():
        check_value(v, int, f"{where}: special token {name!r}", low=0, high=vocab - 1)
    for split, info in m["splits"].items():
        at = f"{where}: split {split!r}"
        check_value(info, dict, at)
        field_of(info, "num_sequences", int, at, low=0)
        for i, shard in enumerate(field_of(info, "shards", list, at)):
            shard_at = f"{at}: shard {i}"
            check_value(shard, dict, shard_at)
            field_of(shard, "num_sequences", int, shard_at, low=0)
            for entry, entry_at in ((shard, shard_at),
                                    (field_of(shard, "boundaries", dict, shard_at), f"{shard_at}: boundaries")):
                _relative_path(field_of(entry, "path", str, entry_at), f"{entry_at}: field 'path'")
                field_of(entry, "sha256", str, entry_at)


def _relative_path(p: str, what: str) -> None:
    """A path inside OUT: relative, no '..', no NUL."""
    if not p or "\0" in p or Path(p).is_absolute() or ".." in Path(p).parts:
        raise UserError(f"{what} is {p!r}, expected a path inside the data directory")


def verify(out: Path | str, checksums: bool = True) -> list[str]:
    """Problems found in OUT: shapes and dtypes always, sha256 of every file when checksums."""
    out = Path(out)
    m = load_manifest(out)
    problems = []
    row_bytes = (m["seq_len"] + 7) // 8
    for split, info in m["splits"].items():
        total = 0
        for shard in info["shards"]:
            total += shard["num_sequences"]
            for path, sha, shape in ((shard["path"], shard["sha256"], (shard["num_sequences"], m["seq_len"])),
                                     (shard["boundaries"]["path"], shard["boundaries"]["sha256"],
                                      (shard["num_sequences"], row_bytes))):
                f = out / path
                if not f.exists():
                    problems.append(f"{f}: missing")
                    continue
                try:
                    arr = np.load(f, mmap_mode="r")
                except (ValueError, OSError) as e:
                    problems.append(f"{f}: not a readable .npy file ({e})")
                    continue
                if not isinstance(arr, np.ndarray):  # an .npz archive
                    problems.append(f"{f}: not a .npy file")
                    continue
                if arr.shape != shape:
                    problems.append(f"{f}: shape {arr.shape}, manifest says {shape}")
                if checksums and sha256_file(f) != sha:
                    problems.append(f"{f}: sha256 does not match the manifest")
        if total != info["num_sequences"]:
            problems.append(f"{out / 'manifest.json'}: {split} shards hold {total} sequences, "
                            f"the split says {info['num_sequences']}")
    if not (out / m["tokenizer"]).is_dir():
        problems.append(f"{out / m['tokenizer']}: tokenizer directory missing")
    return problems
