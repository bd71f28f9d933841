"""transformers classes for a BERT whose layers have their own head counts and FFN widths (what
EarlyBERT pruning leaves). Self-contained (torch and transformers only): the export copies this
file next to the weights, so `AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True)`
loads a pruned model in a fresh Python process; importing this module registers the classes
for `from_pretrained(dir)` without remote code.
"""
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, BertConfig, BertForMaskedLM


class EarlyBertConfig(BertConfig):
    model_type = "earlybert"

    def __init__(self, earlybert_heads=None, earlybert_ffn=None, earlybert_head_size=64, **kwargs):
        super().__init__(**kwargs)
        self.earlybert_heads = list(earlybert_heads or [])
        self.earlybert_ffn = list(earlybert_ffn or [])
        self.earlybert_head_size = earlybert_head_size


class EarlyBertForMaskedLM(BertForMaskedLM):
    config_class = EarlyBertConfig

    def __init__(self, config):
        super().__init__(config)
        hidden, hs = config.hidden_size, config.earlybert_head_size
        for layer, heads, ffn in zip(self.bert.encoder.layer, config.earlybert_heads, config.earlybert_ffn):
            attn = layer.attention.self
            for name in ("query", "key", "value"):
                setattr(attn, name, nn.Linear(hidden, heads * hs))
            attn.num_attention_heads, attn.attention_head_size = heads, hs
            attn.all_head_size, attn.scaling = heads * hs, hs ** -0.5
            layer.attention.output.dense = nn.Linear(heads * hs, hidden)
            layer.intermediate.dense = nn.Linear(hidden, ffn)
            layer.output.dense = nn.Linear(ffn, hidden)
        self.post_init()


try:
    AutoConfig.register("earlybert", EarlyBertConfig)
    AutoModelForMaskedLM.register(EarlyBertConfig, EarlyBertForMaskedLM)
except ValueError:  # already registered (imported both as pipeline code and as remote code)
    pass
