"""`python -m data_prep inspect OUT`: what a build holds, and a few sequences decoded."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import load_manifest
from .reader import PackedDataset


def inspect(out: Path, samples: int = 3) -> None:
    from transformers import AutoTokenizer

    m = load_manifest(out)
    tok = AutoTokenizer.from_pretrained(str(Path(out) / m["tokenizer"]))
    print(f"{out}: format {m['format_version']}, seq_len {m['seq_len']}, vocab {m['vocab_size']} "
          f"({m.get('dtype')}), seed {m.get('seed')}")
    for s in m.get("sources", []):
        print(f"  source {s['spec']}: read {s['documents_read']}, kept {s['documents_kept']}, "
              f"skipped {s['skipped']}, repaired {s.get('repaired', {})}")
    v = m.get("validation_split")  # format 2 on
    if v:
        print(f"  validation split: {v['documents']:,} of {v['total_documents']:,} documents, "
              f"{v['tokens']:,} of {v['total_tokens']:,} tokens ({v['fraction']:.4%}; "
              f"--val-fraction {v['fraction_asked']})")
    pad = m["special_tokens"]["pad"]
    for split, info in m["splits"].items():
        print(f"  {split}: {info['num_sequences']:,} sequences, {info['num_tokens']:,} tokens, "
              f"{len(info['shards'])} shards")
        if not info["num_sequences"]:
            continue
        ds = PackedDataset(out, split)
        idx = np.linspace(0, len(ds) - 1, min(len(ds), 2000)).astype(int)
        tokens, bits = ds.batch(idx)
        docs = np.unpackbits(bits, axis=1, count=m["seq_len"]).sum(1)
        fill = (tokens != pad).mean()
        unk = (tokens == m["special_tokens"]["unk"]).mean()
        print(f"    sample of {len(idx)}: documents per sequence mean {docs.mean():.2f} max {docs.max()}, "
              f"non-pad {fill:.4f}, [UNK] {unk:.4%}")
    if samples and m["splits"]["train"]["num_sequences"]:
        ds = PackedDataset(out, "train")
        for i in np.linspace(0, len(ds) - 1, min(samples, len(ds))).astype(int):
            t, b = ds[int(i)]
            starts = np.flatnonzero(np.unpackbits(b, count=m["seq_len"]))
            parts = [tok.decode(t[a:z]) for a, z in zip(starts, list(starts[1:]) + [len(t)])]
            print(f"\n  train[{i}] ({len(parts)} segment(s)):\n    " + "\n    || ".join(parts))
