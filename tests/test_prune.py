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
