"""Reading and verifying a data_prep output directory (OUT)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

from .files import sha256_file

REQUIRED = ("format_version", "seq_len", "vocab_size", "tokenizer", "special_tokens", "splits")


def load_manifest(out: Path | str) -> dict:
    path = Path(out) / "manifest.json"
    if not path.exists():
        raise UserError(f"{path}: no manifest (not a data_prep output, or the build has not "
                        "finished: rerun its command)")
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    missing = [k for k in REQUIRED if k not in m]
    if missing or not all(s in m["splits"] for s in ("train", "validation")):
        raise UserError(f"{path}: not a data_prep manifest (missing {missing or 'splits'})")
    return m


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
