"""The pruned model computes what the masked gated dense model computes."""
import numpy as np
import pytest
import torch

from pipeline.earlybird import ffn_masks, head_masks
from pipeline.model import BertConfig, BertForMLM
from pipeline.prune import prune


def gated_model(seed=0):
    torch.manual_seed(seed)
    c = BertConfig(vocab_size=500, hidden_size=96, heads=[6, 6, 6], ffn=[192, 192, 192], head_size=16,
                   gates=True, dropout=0.0, attention_dropout=0.0)
    m = BertForMLM(c).eval()
    with torch.no_grad():
        for g in m.gates():
            g.uniform_(-1.2, 1.2)  # trained gates: any sign, any size
    return m


def test_pruned_equals_masked_gated_model():
    model = gated_model()
    layers = model.bert.encoder.layer
    heads = head_masks([l.attention.self.head_gates.detach().numpy() for l in layers], 2)
    ffn = ffn_masks([l.intermediate.ffn_gates.detach().numpy() for l in layers], 0.3)
    small = prune(model, heads, ffn).eval()
    assert small.config.heads == [4, 4, 4] and sum(small.config.ffn) == round(0.7 * 576)
    assert len(set(small.config.ffn)) > 1  # global FFN pruning: widths differ per layer
    with torch.no_grad():  # the masked gated model: dropped units' gates set to 0
        for l, h, f in zip(layers, heads, ffn):
            l.attention.self.head_gates[torch.from_numpy(~h)] = 0.0
            l.intermediate.ffn_gates[torch.from_numpy(~f)] = 0.0
    ids = torch.randint(5, 500, (3, 48))
    seg = torch.zeros(3, 48, dtype=torch.int32)
    seg[:, 30:] = 1
    with torch.no_grad():
        a = model(ids, segment_ids=seg)
        b = small(ids, segment_ids=seg)
    assert (a - b).abs().max() < 1e-5
    assert small.num_parameters() < model.num_parameters()


def test_bad_tickets():
    model = gated_model()
    heads = [np.ones(6, bool)] * 3
    ffn = [np.ones(192, bool)] * 3
    with pytest.raises(ValueError, match="every head"):
        prune(model, [np.zeros(6, bool)] + heads[1:], ffn)
    with pytest.raises(ValueError, match="layers"):
        prune(model, heads[:2], ffn[:2])
    with pytest.raises(ValueError, match="layer 0"):
        prune(model, [np.ones(5, bool)] + heads[1:], ffn)


def test_pruned_export_loads_in_a_fresh_process(tmp_path):
    """Per-layer sizes load with AutoModelForMaskedLM (trust_remote_code: the class ships
    beside the weights) and give our pruned model's logits."""
    import subprocess
    import sys

    from pipeline.hf import export
    model = gated_model()
    layers = model.bert.encoder.layer
    heads = head_masks([l.attention.self.head_gates.detach().numpy() for l in layers], 2)
    ffn = ffn_masks([l.intermediate.ffn_gates.detach().numpy() for l in layers], 0.3)
    small = prune(model, heads, ffn).eval()
    export(small, tmp_path / "final", None)
    ids = torch.randint(5, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(small(ids), tmp_path / "ours.pt")
    code = f"""
import torch
from transformers import AutoModelForMaskedLM
m = AutoModelForMaskedLM.from_pretrained({str(tmp_path / 'final')!r}, trust_remote_code=True).eval()
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    diff = (m(input_ids=ids).logits - torch.load({str(tmp_path / 'ours.pt')!r})).abs().max().item()
print("DIFF", diff, type(m).__name__, [l.intermediate.dense.out_features for l in m.bert.encoder.layer])
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.split("DIFF")[1].split()
    assert float(line[0]) < 1e-4 and line[1] == "EarlyBertForMaskedLM"
    assert str(small.config.ffn[0]) in r.stdout
