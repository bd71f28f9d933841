"""transformers classes for a BERT whose layers have their own head counts and FFN widths (what
EarlyBERT pruning leaves). Self-contained (torch and transformers only): the export copies this
file next to the weights and names every class in the config's `auto_map`, so in a fresh Python
process

    AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True, num_labels=2)

(and AutoModel, AutoModelForMaskedLM, ...TokenClassification, ...QuestionAnswering,
...MultipleChoice) builds the pruned encoder and loads it, ready for transformers' Trainer.
Importing this module also registers the classes for `from_pretrained(DIR)` without remote code.

Each class is transformers' own BERT class with the encoder's linear layers rebuilt at the
per-layer sizes, so the heads, losses and outputs are exactly transformers' (no copy to drift).
"""
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForMultipleChoice,
                          AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, BertConfig, BertForMaskedLM, BertForMultipleChoice,
                          BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification,
                          BertModel)


class EarlyBertConfig(BertConfig):
    model_type = "earlybert"

    def __init__(self, earlybert_heads=None, earlybert_ffn=None, earlybert_head_size=64, **kwargs):
        super().__init__(**kwargs)
        self.earlybert_heads = list(earlybert_heads or [])
        self.earlybert_ffn = list(earlybert_ffn or [])
        self.earlybert_head_size = earlybert_head_size
        if len(self.earlybert_heads) != len(self.earlybert_ffn):
            raise ValueError(f"earlybert_heads has {len(self.earlybert_heads)} layers, "
                             f"earlybert_ffn {len(self.earlybert_ffn)}")


def resize_encoder(encoder: nn.Module, config: EarlyBertConfig) -> None:
    """Rebuilds each layer's attention and FFN projections at its own size. transformers'
    attention reshapes with -1 heads and its own head size, so only the widths need to change."""
    if len(encoder.layer) != len(config.earlybert_heads):
        raise ValueError(f"the encoder has {len(encoder.layer)} layers, earlybert_heads "
                         f"{len(config.earlybert_heads)}")
    hidden, hs = config.hidden_size, config.earlybert_head_size
    for layer, heads, ffn in zip(encoder.layer, config.earlybert_heads, config.earlybert_ffn):
        attn = layer.attention.self
        for name in ("query", "key", "value"):
            setattr(attn, name, nn.Linear(hidden, heads * hs))
        attn.num_attention_heads, attn.attention_head_size = heads, hs
        attn.all_head_size, attn.scaling = heads * hs, hs ** -0.5
        layer.attention.output.dense = nn.Linear(heads * hs, hidden)
        layer.intermediate.dense = nn.Linear(hidden, ffn)
        layer.output.dense = nn.Linear(ffn, hidden)


class PerLayerSizes:
    """Mixed in before a transformers BERT class: builds it, then resizes its encoder."""
    config_class = EarlyBertConfig

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        resize_encoder(self.encoder if isinstance(self, BertModel) else self.bert.encoder, config)
        self.post_init()  # initialises the new layers (from_pretrained then loads the weights)


class EarlyBertModel(PerLayerSizes, BertModel):
    pass


class EarlyBertForMaskedLM(PerLayerSizes, BertForMaskedLM):
    pass


class EarlyBertForSequenceClassification(PerLayerSizes, BertForSequenceClassification):
    pass


class EarlyBertForTokenClassification(PerLayerSizes, BertForTokenClassification):
    pass


class EarlyBertForQuestionAnswering(PerLayerSizes, BertForQuestionAnswering):
    pass


class EarlyBertForMultipleChoice(PerLayerSizes, BertForMultipleChoice):
    pass


AUTO_CLASSES = {  # the export's auto_map is built from this table
    AutoConfig: EarlyBertConfig,
    AutoModel: EarlyBertModel,
    AutoModelForMaskedLM: EarlyBertForMaskedLM,
    AutoModelForSequenceClassification: EarlyBertForSequenceClassification,
    AutoModelForTokenClassification: EarlyBertForTokenClassification,
    AutoModelForQuestionAnswering: EarlyBertForQuestionAnswering,
    AutoModelForMultipleChoice: EarlyBertForMultipleChoice,
}

for _auto, _cls in AUTO_CLASSES.items():
    try:
        if _auto is AutoConfig:
            _auto.register("earlybert", _cls)
        else:
            _auto.register(EarlyBertConfig, _cls)
    except ValueError:  # already registered (imported both as pipeline code and as remote code)
        pass
