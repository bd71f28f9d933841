"""The GPU path's CPU-checkable parts: the MFU peak table, what the collator precomputes for a
sync-free step (document bounds, predicted positions, attention FLOPs), the FLOP count, and a
resumed search keeping its FFN multiple."""
import numpy as np
import pytest
import torch

from data_prep.reader import MaskingCollator, PackedDataset
from pipeline.mfu import datasheet_peak, peak_flops
from pipeline.model import BertConfig, BertForMLM, cu_seqlens
from pipeline.errors import UserError
from pipeline.settings import SearchSettings
from pipeline.stage import resolve_ffn_multiple


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H100 NVL", "bf16", 835.5),
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA A100-SXM4-40GB", "bf16", 312.0), ("NVIDIA A100 80GB PCIe", "fp16", 312.0),
    ("NVIDIA L40S", "bf16", 362.1), ("NVIDIA L4", "bf16", 121.0), ("NVIDIA H100 80GB HBM3", "fp32", 66.9),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156.0), ("Tesla V100-SXM2-32GB", "tf32", 15.7), ("NVIDIA GH200 480GB", "bf16", 989.4)])
def test_peak_by_exact_device_and_dtype(name, dtype, tflops):
    assert datasheet_peak(name, dtype) == pytest.approx(tflops * 1e12)


def test_unknown_devices_are_measured_not_invented():
    assert datasheet_peak("NVIDIA A10G", "bf16") is None  # not an A10
    assert datasheet_peak("Some Future GPU", "bf16") is None
    peak, source = peak_flops(torch.device("cpu"), torch.float32)
    assert peak > 1e8 and "measured" in source


def test_collator_precomputes_bounds_positions_and_pairs(small_data):
    ds = PackedDataset(small_data, "train")
    m = ds.manifest
    collate = MaskingCollator(m["vocab_size"], m["special_tokens"])
    rng = np.random.default_rng(0)
    for trial in range(20):
        idx = rng.choice(len(ds), 6, replace=False)
        tokens, bits = ds.batch(idx)
        bits = bits.copy()
        if trial % 2:  # rows whose first boundary bit is unset, or that are all boundaries
            bits[0, 0] &= 0x7F
            bits[1] = 0xFF
        b = collate(tokens, bits, torch.Generator().manual_seed(trial))
        assert torch.equal(b["cu_seqlens"], cu_seqlens(b["segment_ids"]))
        assert torch.equal(b["mlm_index"], torch.nonzero(b["labels"].reshape(-1) != -100).squeeze(1))
        lengths = (b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).long()
        assert b["attention_pairs"] == int((lengths ** 2).sum())


def test_flops_and_precomputed_positions():
    torch.manual_seed(0)
    model = BertForMLM(BertConfig(vocab_size=500, hidden_size=64, heads=[2, 1], ffn=[128, 96], head_size=32,
                                  dropout=0.0, attention_dropout=0.0)).eval()
    assert model.flops(128, 128 * 128, 0.15 * 128) == pytest.approx(model.flops_per_sequence(128, 0.15))
    ids = torch.randint(5, 500, (3, 16))
    seg = torch.zeros(3, 16, dtype=torch.int32)
    seg[:, 9:] = 1
    labels = torch.where(torch.rand(3, 16) < 0.3, ids, torch.full_like(ids, -100))
    idx = torch.nonzero(labels.reshape(-1) != -100).squeeze(1)
    with torch.no_grad():
        a = model(ids, segment_ids=seg, labels=labels)
        b = model(ids, segment_ids=seg, labels=labels, mlm_index=idx, cu_seqlens=cu_seqlens(seg))
    assert a[0] == b[0] and a[1] == b[1] == len(idx) and a[2] == b[2]


def test_a_resumed_search_keeps_its_ffn_multiple():
    assert resolve_ffn_multiple(None, None) == 64
    assert resolve_ffn_multiple(8, None) == 8
    began = SearchSettings.from_record({"ffn_multiple": 16}, "search.json")
    old = SearchSettings.from_record({}, "search.json")  # a search begun before the flag existed
    assert resolve_ffn_multiple(None, began) == 16
    assert resolve_ffn_multiple(None, old) == 1
    assert resolve_ffn_multiple(16, began) == 16
    with pytest.raises(UserError, match="began with 1"):
        resolve_ffn_multiple(64, old)
