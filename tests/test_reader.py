"""The reader the trainer uses: memory-mapped dataset, resumable sampler, masking collator."""
import numpy as np
import pytest
import torch

from data_prep.build import BuildArgs, build
from data_prep.reader import MaskingCollator, PackedDataset, ResumableSampler


@pytest.fixture(scope="module")
def data(tmp_path_factory, wiki_dump):
    out = tmp_path_factory.mktemp("reader") / "out"
    build(BuildArgs(out=out, sources=[f"wikipedia:{wiki_dump}"], workers=2, shard_size=1200,
                    val_fraction=0.05))
    return out


def test_dataset_is_zero_copy_and_spans_shards(data):
    ds = PackedDataset(data, "train")
    assert len(ds.tokens) == 4 and len(ds) == sum(len(t) for t in ds.tokens)
    row, bits = ds[1200]  # first row of the second shard
    assert isinstance(row.base, np.memmap) or isinstance(row, np.memmap)
    assert (row == ds.tokens[1][0]).all() and (bits == ds.bits[1][0]).all()
    with pytest.raises(IndexError):
        ds[len(ds)]
    tokens, bits = ds.batch([0, len(ds) - 1])
    assert tokens.shape == (2, 128) and bits.shape == (2, 16)


def test_sampler_ranks_partition_each_epoch_and_resume_exactly():
    n, world, bs = 103, 2, 4
    ranks = [ResumableSampler(n, r, world, seed=3) for r in range(world)]
    seen = [np.concatenate([s.next_batch(bs) for _ in range(13)]) for s in ranks]  # 104 positions
    per_epoch = n // world * world
    epoch0 = np.concatenate([s[: per_epoch // world // bs * bs] for s in seen])
    assert len(set(seen[0]) & set(seen[1][:12])) == 0  # disjoint within an epoch
    assert len(np.unique(epoch0)) == len(epoch0)
    # Resume from the consumed count: the continuation equals the uninterrupted stream.
    full = ResumableSampler(n, 1, world, seed=3)
    stream = [full.next_batch(bs) for _ in range(40)]
    resumed = ResumableSampler(n, 1, world, seed=3, consumed=17 * bs * world)
    assert all((resumed.next_batch(bs) == stream[17 + i]).all() for i in range(23))
    # Epochs: a different order each epoch, every sample once per epoch.
    one = ResumableSampler(10, seed=0)
    e0, e1 = one.next_batch(10), one.next_batch(10)
    assert sorted(e0) == sorted(e1) == list(range(10)) and (e0 != e1).any()


def test_masking_collator(data):
    ds = PackedDataset(data, "train")
    import json
    m = json.loads((data / "manifest.json").read_text())
    special = m["special_tokens"]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    tokens, bits = ds.batch(range(512))
    col = MaskingCollator(m["vocab_size"], special)
    out = col(tokens, bits, torch.Generator().manual_seed(0))
    ids = torch.from_numpy(tokens.astype(np.int64))
    chosen = out["labels"] != -100
    assert (out["labels"][chosen] == ids[chosen]).all()
    is_special = torch.isin(ids, torch.tensor(list(special.values())))
    assert not chosen[is_special].any()  # [CLS], [SEP], [PAD] never masked
    rate = chosen.float().sum() / (~is_special).sum()
    assert 0.14 < rate < 0.16
    masked = out["input_ids"][chosen]
    frac_mask = (masked == special["mask"]).float().mean()
    frac_same = (masked == ids[chosen]).float().mean()
    assert 0.78 < frac_mask < 0.82 and 0.08 < frac_same < 0.12
    assert (out["input_ids"][~chosen] == ids[~chosen]).all()
    # Deterministic for a given generator state; different for another.
    again = col(tokens, bits, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], out["input_ids"])
    other = col(tokens, bits, torch.Generator().manual_seed(1))
    assert not torch.equal(other["input_ids"], out["input_ids"])
    # Segment ids follow the stored document starts; [SEP] ends a document.
    seg = out["segment_ids"]
    starts = np.unpackbits(bits, axis=1, count=128).astype(bool)
    assert (seg[:, 0] == 0).all()
    assert torch.equal(seg, torch.from_numpy(np.cumsum(starts, axis=1) - 1).to(seg.dtype))
    sep_then = (ids[:, :-1] == special["sep"]) & (ids[:, 1:] != special["pad"])
    assert (seg[:, 1:][sep_then] == seg[:, :-1][sep_then] + 1).all()
    # Whole-word masking: a word's pieces are masked together.
    wwm = MaskingCollator(m["vocab_size"], special, whole_word=True, tokenizer=tok)
    out = wwm(tokens, bits, torch.Generator().manual_seed(0))
    chosen = out["labels"] != -100
    cont = wwm.continuation[ids]
    # (a piece that follows [CLS] or a document start has its word's head elsewhere)
    follows = cont[:, 1:] & ~is_special[:, :-1] & ~torch.from_numpy(starts[:, 1:])
    assert (chosen[:, 1:][follows] == chosen[:, :-1][follows]).all()
    assert 0.12 < chosen.float().sum() / (~is_special).sum() < 0.18
