"""Physical pruning: from a gated dense model and a ticket (head and FFN masks) to the smaller
model that computes exactly what the masked gated model computed.

Each kept gate's value is folded into the weights that follow it (a head's gate into its
columns of the attention output projection, an FFN neuron's gate into its column of the second
FFN linear), then the dropped heads' Q, K, V rows and output-projection columns and the dropped
neurons' first-linear rows and second-linear columns are sliced away. Head size is unchanged,
so a layer keeping 8 of 12 heads has an attention width of 8 x 64.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .model import BertConfig, BertForMLM, LayerNames, is_gate


def pruned_config(config: BertConfig, heads: list[np.ndarray], ffn: list[np.ndarray]) -> BertConfig:
    if len(heads) != config.num_layers or len(ffn) != config.num_layers:
        raise ValueError(f"the ticket has {len(heads)} layers, the model {config.num_layers}")
    for i, (h, f) in enumerate(zip(heads, ffn)):
        if len(h) != config.heads[i] or len(f) != config.ffn[i]:
            raise ValueError(f"layer {i}: the ticket has {len(h)} heads and {len(f)} FFN neurons, "
                             f"the model {config.heads[i]} and {config.ffn[i]}")
        if not h.any() or not f.any():
            raise ValueError(f"layer {i}: the ticket prunes every head or every FFN neuron")
    return replace(config, heads=[int(h.sum()) for h in heads], ffn=[int(f.sum()) for f in ffn],
                   gates=False)


def prune_state_dict(sd: dict[str, torch.Tensor], config: BertConfig, heads: list[np.ndarray],
                     ffn: list[np.ndarray], fold_gates: bool = True) -> dict[str, torch.Tensor]:
    """The pruned model's weights (fp32). fold_gates=False drops the gates' values instead
    (for rewinding to weights taken before the search, whose gates are all 1)."""
    out = {k: v.detach().float().clone() for k, v in sd.items() if not is_gate(k)}
    hs = config.head_size
    for i in range(config.num_layers):
        n = LayerNames(i)
        keep_h = torch.from_numpy(np.asarray(heads[i], dtype=bool))
        keep_cols = keep_h.repeat_interleave(hs)
        keep_f = torch.from_numpy(np.asarray(ffn[i], dtype=bool))
        o_w = out[n.attention_out_weight]
        f_w = out[n.ffn_out_weight]
        if fold_gates:
            hg = sd.get(n.head_gates)
            if hg is not None:
                o_w = o_w * hg.detach().float().repeat_interleave(hs)[None, :]
            fg = sd.get(n.ffn_gates)
            if fg is not None:
                f_w = f_w * fg.detach().float()[None, :]
        for x in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                name = getattr(n, f"{x}_{kind}")
                out[name] = out[name][keep_cols].clone()
        out[n.attention_out_weight] = o_w[:, keep_cols].clone()
        out[n.ffn_in_weight] = out[n.ffn_in_weight][keep_f].clone()
        out[n.ffn_in_bias] = out[n.ffn_in_bias][keep_f].clone()
        out[n.ffn_out_weight] = f_w[:, keep_f].clone()
    return out


def prune(model: BertForMLM, heads: list[np.ndarray], ffn: list[np.ndarray]) -> BertForMLM:
    config = pruned_config(model.config, heads, ffn)
    small = BertForMLM(config)
    small.load_state_dict(prune_state_dict(model.state_dict(), model.config, heads, ffn))
    return small
