"""The validation split: --val-fraction of the tokens, met by whole documents.

Each document has a seeded hash of its key (doc_hash). Once every unit is tokenized, the documents
are taken in hash order while they fit: a document joins the split if the split then holds at
most (1 + TOLERANCE) x the asked tokens, and the walk stops once the asked tokens are reached.
The choice depends only on the documents' keys, token counts and the seed: not on reading order,
workers, units or tasks. No document is cut across the splits (a document read in pieces or in
several units is one key).

A corpus of a few long documents (books) may not allow the fraction: then the split holds what
fits and the build warns with the figures it reached. A split that would be empty (no document
small enough, or a corpus of one document) is refused, naming the smallest document's share,
unless --val-fraction is 0.
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np

from pipeline.errors import UserError

TOLERANCE = 0.1


def doc_hash(key: str, seed: int) -> int:
    """A document's place in the split's walk, from its key alone (64 bits)."""
    h = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big")


def choose_validation(docs: np.ndarray, tokens: np.ndarray, fraction: float,
                      where: str = "the corpus") -> tuple[np.ndarray, dict]:
    """The validation documents (sorted uint64 hashes) from every piece's document hash and token
    count, and the split's figures for the manifest."""
    hashes, inverse = np.unique(np.asarray(docs, dtype=np.uint64), return_inverse=True)
    per_doc = np.bincount(inverse.reshape(-1), weights=np.asarray(tokens, dtype=np.float64),
                          minlength=len(hashes)).astype(np.int64)
    hashes, per_doc = hashes[per_doc > 0], per_doc[per_doc > 0]  # empty documents are dropped
    total = int(per_doc.sum())
    target = fraction * total
    chosen: list[int] = []
    held = 0
    if fraction > 0 and len(hashes):  # none: the shard stage says the corpus has no usable document
        for i in range(len(hashes)):  # hash order: np.unique sorts
            if held >= target:
                break
            if held + per_doc[i] <= target * (1 + TOLERANCE):
                chosen.append(i)
                held += int(per_doc[i])
        if len(chosen) == len(hashes) > 1:
            held -= int(per_doc[chosen.pop()])  # the train split keeps a document
        if not chosen:
            smallest = int(per_doc.min())
            raise UserError(f"--val-fraction {fraction}: no document of {where} fits in {fraction:.4%} of "
                            f"its {total:,} tokens (+{TOLERANCE:.0%}): the smallest of its {len(hashes)} "
                            f"document(s) holds {smallest / total:.4%}; pass a larger --val-fraction, "
                            "or --val-fraction 0 for no validation split")
    figures = {"fraction_asked": fraction, "documents": len(chosen), "tokens": held,
               "fraction": held / total if total else 0.0, "total_tokens": total,
               "total_documents": len(hashes)}
    if len(hashes) and fraction > 0 and abs(held - target) > TOLERANCE * target:
        print(f"warning: validation split: {len(chosen)} of {len(hashes)} documents, {held:,} of "
              f"{total:,} tokens ({figures['fraction']:.4%}), asked {fraction:.4%}: {where}'s documents "
              f"are too few or too long to meet --val-fraction within {TOLERANCE:.0%}", file=sys.stderr)
    return np.sort(hashes[chosen]), figures
