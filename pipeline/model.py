"""A gating-aware BERT for masked-language-model pre-training, read top to bottom.

Parameter names are exactly those of transformers' BertForMaskedLM, so weights convert both
ways. Every layer may have its own number of heads (head size fixed) and its own FFN width:
that is what EarlyBERT pruning leaves. Optional gates (EarlyBERT's searching stage): one scalar
per attention head, scaling that head's context before the output projection, and one per FFN
neuron, scaling the activation after GELU. Attention stays inside each packed document:
`sdpa` (the default) through scaled_dot_product_attention with a block-diagonal mask (any
device, attention dropout honoured); `varlen` on CUDA through a variable-length flash kernel
over the documents (flash-attn's when installed, which has dropout; else torch's, which has
none, so it needs attention dropout 0, as ModernBERT trains).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.reader import cu_seqlens
from pipeline.errors import UserError
from pipeline.settings import field_of, int_list, json_kind, json_object

PRESETS = {  # layers, hidden, heads (FFN = 4 x hidden)
    "bert-tiny": (2, 128, 2), "bert-mini": (4, 256, 4), "bert-small": (4, 512, 8),
    "bert-medium": (8, 512, 8), "bert-base": (12, 768, 12), "bert-large": (24, 1024, 16),
}


# -- parameter names (transformers' BertForMaskedLM layout): the one place they are spelled;
# the trainer, pruning and the Hugging Face export ask for them here.
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
TIED_DECODER = "cls.predictions.decoder.weight"  # the word embeddings, tied
TIED_DECODER_BIAS = "cls.predictions.decoder.bias"  # an alias of cls.predictions.bias
GATE_SUFFIX = "_gates"


def is_gate(name: str) -> bool:
    return name.endswith(GATE_SUFFIX)


@dataclass(frozen=True)
class LayerNames:
    """Layer i's parameter names: the ones pruning slices and gates fold into."""
    i: int

    def __getattr__(self, part: str) -> str:  # e.g. names.query_weight -> ...attention.self.query.weight
        try:
            return f"bert.encoder.layer.{self.i}." + _LAYER_PARTS[part]
        except KeyError:
            raise AttributeError(part) from None


_LAYER_PARTS = {
    "head_gates": "attention.self.head_gates", "ffn_gates": "intermediate.ffn_gates",
    **{f"{x}_{kind}": f"attention.self.{x}.{kind}" for x in ("query", "key", "value") for kind in ("weight", "bias")},
    "attention_out_weight": "attention.output.dense.weight",
    "ffn_in_weight": "intermediate.dense.weight", "ffn_in_bias": "intermediate.dense.bias",
    "ffn_out_weight": "output.dense.weight",
}


# A model config file's fields: the JSON type of each (float: any finite number) and its range.
_FIELDS = {"vocab_size": int, "hidden_size": int, "head_size": int, "max_position_embeddings": int,
           "type_vocab_size": int, "layer_norm_eps": float, "dropout": float, "attention_dropout": float,
           "initializer_range": float, "gates": bool}
_HF_FIELDS = {"num_hidden_layers": int, "hidden_size": int, "num_attention_heads": int, "vocab_size": int,
              "intermediate_size": int, "max_position_embeddings": int, "type_vocab_size": int,
              "layer_norm_eps": float, "hidden_dropout_prob": float, "attention_probs_dropout_prob": float,
              "initializer_range": float}
MAX_LAYERS = 10_000
_LIMITS = {**{k: {"low": 1} for k in ("vocab_size", "hidden_size", "head_size", "max_position_embeddings",
                                      "type_vocab_size", "num_attention_heads", "intermediate_size")},
           "num_hidden_layers": {"low": 1, "high": MAX_LAYERS},
           **{k: {"low": 0, "high": 1} for k in ("dropout", "attention_dropout", "hidden_dropout_prob",
                                                 "attention_probs_dropout_prob")},
           **{k: {"low": 0} for k in ("layer_norm_eps", "initializer_range")}}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    heads: list[int] = field(default_factory=lambda: [12] * 12)  # per layer
    ffn: list[int] = field(default_factory=lambda: [3072] * 12)  # per layer
    head_size: int = 64
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    gates: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @classmethod
    def preset(cls, name: str, **kw) -> "BertConfig":
        layers, hidden, heads = PRESETS[name]
        return cls(hidden_size=hidden, heads=[heads] * layers, ffn=[4 * hidden] * layers,
                   head_size=hidden // heads, **kw)

    @classmethod
    def from_json(cls, path: Path | str, **kw) -> "BertConfig":
        """Our own format (per-layer `heads` and `ffn` lists), or a Hugging Face BERT config.
        Bad content (not JSON, a field missing, of the wrong type or out of range): UserError
        naming the file. `kw` (the flags' overrides) are applied after the checks."""
        return cls.from_dict(json_object(path), str(path), **kw)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model config", **kw) -> "BertConfig":
        """from_json's reading of a JSON object (e.g. RUN/run.json's `model`), checked; errors
        name `where`."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: holds {json_kind(d)}, expected a JSON object")
        if "num_hidden_layers" in d:  # Hugging Face BertConfig
            for key, kind in _HF_FIELDS.items():
                field_of(d, key, kind, where, **_LIMITS.get(key, {}))
            for key in ("earlybert_heads", "earlybert_ffn"):
                int_list(d, key, where, low=1, default=None)
            field_of(d, "earlybert_head_size", int, where, default=None, low=1)
            n, hidden, h = d["num_hidden_layers"], d["hidden_size"], d["num_attention_heads"]
            d = {"vocab_size": d["vocab_size"], "hidden_size": hidden,
                 "heads": d.get("earlybert_heads", [h] * n),
                 "ffn": d.get("earlybert_ffn", [d["intermediate_size"]] * n),
                 "head_size": d.get("earlybert_head_size", hidden // h),
                 "max_position_embeddings": d["max_position_embeddings"],
                 "type_vocab_size": d["type_vocab_size"], "layer_norm_eps": d["layer_norm_eps"],
                 "dropout": d["hidden_dropout_prob"],
                 "attention_dropout": d["attention_probs_dropout_prob"],
                 "initializer_range": d["initializer_range"]}
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"{where}: unknown model config fields {sorted(unknown)}")
        for key, kind in _FIELDS.items():
            field_of(d, key, kind, where, default=None, **_LIMITS.get(key, {}))
        for key in ("heads", "ffn"):
            int_list(d, key, where, low=1, default=None)
        cfg = cls(**{**d, **kw})
        try:
            cfg.check(where)
        except ValueError as e:  # heads and ffn of different lengths
            raise UserError(str(e)) from None
        return cfg

    def check(self, where: str = "model config") -> None:
        if len(self.heads) != len(self.ffn) or not self.heads:
            raise ValueError(f"{where}: `heads` and `ffn` need one entry per layer "
                             f"(got {len(self.heads)} and {len(self.ffn)})")
        if min(self.heads) < 1 or min(self.ffn) < 1:
            raise ValueError(f"{where}: every layer needs at least one head and one FFN neuron")

    def to_dict(self) -> dict:
        return asdict(self)


ATTENTION = ("sdpa", "varlen")


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] boolean: query i may attend key j iff both lie in the same document."""
    return (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])


def padding_mask(attention_mask: torch.Tensor | None, device) -> torch.Tensor:
    """sdpa's boolean mask [B, 1, 1, L] from transformers' attention_mask (1 = token, 0 =
    padding); without one, every token attends to every other."""
    if attention_mask is None:
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    return attention_mask[:, None, None, :].bool()


def _varlen_kernel():
    """(function, supports dropout): flash-attn's varlen function, else torch's, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func, True
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn, False
    except ImportError:
        return None, False


VARLEN, VARLEN_DROPOUT = _varlen_kernel()


def _half_on_cuda(x: torch.Tensor) -> bool:
    """Will the attention inputs be bf16/fp16 CUDA tensors (the flash kernels' only types)?"""
    if not x.is_cuda:
        return False
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda") in (torch.float16, torch.bfloat16)
    return x.dtype in (torch.float16, torch.bfloat16)


def varlen_attention(q, k, v, cu, max_len: int, dropout_p: float):
    """q, k, v [T, heads, head_size] over the flattened batch; documents delimited by cu."""
    if VARLEN_DROPOUT:
        return VARLEN(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p)
    if dropout_p > 0:  # set_attention refuses this; a guard against silently dropping dropout
        raise RuntimeError("torch's varlen attention has no dropout: set attention dropout to 0")
    return VARLEN(q, k, v, cu, cu, max_len, max_len)


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, input_ids, token_type_ids=None):
        L = input_ids.shape[1]
        pos = torch.arange(L, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig, heads: int):
        super().__init__()
        self.heads, self.head_size = heads, c.head_size
        width = heads * c.head_size
        self.query = nn.Linear(c.hidden_size, width)
        self.key = nn.Linear(c.hidden_size, width)
        self.value = nn.Linear(c.hidden_size, width)
        self.dropout_p = c.attention_dropout
        # EarlyBERT: one gate per head, scaling the head's context (fp32, no weight decay).
        self.head_gates = nn.Parameter(torch.ones(heads)) if c.gates else None

    def forward(self, x, cu, mask):
        B, L, _ = x.shape
        q, k, v = (lin(x).view(B, L, self.heads, self.head_size) for lin in (self.query, self.key, self.value))
        p = self.dropout_p if self.training else 0.0
        if mask is None:  # varlen: documents delimited by cu over the flattened batch
            T = B * L
            ctx = varlen_attention(q.reshape(T, self.heads, self.head_size), k.reshape(T, self.heads, self.head_size),
                                   v.reshape(T, self.heads, self.head_size), cu, L, p)
            ctx = ctx.view(B, L, self.heads, self.head_size)
        else:
            ctx = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, dropout_p=p).transpose(1, 2)
        penalty = None
        if self.head_gates is not None:
            ctx = ctx * self.head_gates.to(ctx.dtype)[:, None]
            penalty = self.head_gates.float().abs().sum()
        return ctx.reshape(B, L, self.heads * self.head_size), penalty


class SelfOutput(nn.Module):
    def __init__(self, c: BertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(width, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    def __init__(self, c: BertConfig, heads: int):
        super().__init__()
        self.self = SelfAttention(c, heads)
        self.output = SelfOutput(c, heads * c.head_size)

    def forward(self, x, cu, mask):
        ctx, penalty = self.self(x, cu, mask)
        return self.output(ctx, x), penalty


class Intermediate(nn.Module):
    def __init__(self, c: BertConfig, ffn: int):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, ffn)
        # EarlyBERT: one gate per FFN neuron, after GELU (fp32, no weight decay).
        self.ffn_gates = nn.Parameter(torch.ones(ffn)) if c.gates else None

    def forward(self, x):
        h = F.gelu(self.dense(x))
        if self.ffn_gates is None:
            return h, None
        return h * self.ffn_gates.to(h.dtype), self.ffn_gates.float().abs().sum()


class Layer(nn.Module):
    def __init__(self, c: BertConfig, heads: int, ffn: int):
        super().__init__()
        self.attention = Attention(c, heads)
        self.intermediate = Intermediate(c, ffn)
        self.output = SelfOutput(c, ffn)

    def forward(self, x, cu, mask):
        """Hidden states and the layer's sum of |gate| (None without gates). The L1 term leaves
        each module as an output so that ZeRO-3 regathers the gates for its backward."""
        x, head_penalty = self.attention(x, cu, mask)
        h, ffn_penalty = self.intermediate(x)
        penalty = None if head_penalty is None else head_penalty + ffn_penalty
        return self.output(h, x), penalty


class Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c, h, f) for h, f in zip(c.heads, c.ffn))


class Bert(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)

    def layers(self, x, cu, mask):
        """The embeddings X through every layer: hidden states and the sum of |gate| over layers
        (None without gates); cu or mask says which tokens attend to which (BertForMLM._encode)."""
        penalty = None
        for layer in self.encoder.layer:
            x, p = layer(x, cu, mask)
            if p is not None:
                penalty = p if penalty is None else penalty + p
        return x, penalty


class PredictionTransform(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class Predictions(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.transform = PredictionTransform(c)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size)
        self.bias = self.decoder.bias  # the same Parameter, as in transformers

    def forward(self, x):
        return self.decoder(self.transform(x))


class MLMHead(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.predictions = Predictions(c)


def init_weights(m: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) for linear and embedding weights, zero biases,
    LayerNorm at identity (gates keep their 1)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def param_groups(module: nn.Module, weight_decay: float, gates_apart: bool = False) -> list[dict]:
    """AdamW groups: no weight decay on biases, LayerNorm and gates (EARLYBERT.md); a tied
    parameter once. gates_apart: the gates in a third group marked "gates" (its own LR, set by
    the trainer), when the model has gates."""
    decay, no_decay, gates, seen = [], [], [], set()
    for n, p in module.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if is_gate(n) and gates_apart:
            gates.append(p)
        else:
            (no_decay if p.ndim < 2 or is_gate(n) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups + ([{"params": gates, "weight_decay": 0.0, "gates": True}] if gates else [])


class BertForMLM(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        config.check()
        self.config = config
        self.bert = Bert(config)
        self.cls = MLMHead(config)
        self.apply(partial(init_weights, std=config.initializer_range))
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied
        self.l1 = 0.0  # EarlyBERT's L1 coefficient on |gate|, added to the training loss
        self.last_penalty = None  # sum of |gate| of the last forward (detached), for logging
        self.attention = "sdpa"  # how packed documents are kept apart: see set_attention

    def set_attention(self, impl: str) -> None:
        """`sdpa`: block-diagonal mask, any device, dropout honoured. `varlen`: a variable-length
        flash kernel on CUDA in bf16/fp16 (elsewhere the sdpa path); with torch's kernel, which has
        no dropout, only with attention dropout 0."""
        if impl not in ATTENTION:
            raise ValueError(f"attention {impl!r}: one of {', '.join(ATTENTION)}")
        if impl == "varlen" and not VARLEN_DROPOUT and self.config.attention_dropout > 0:
            raise ValueError(f"attention varlen: torch's variable-length kernel has no dropout and the model's "
                             f"attention dropout is {self.config.attention_dropout}: set it to 0 "
                             "(--attention_dropout 0) or install flash-attn")
        self.attention = impl

    def encode(self, input_ids, segment_ids=None, attention_mask=None, token_type_ids=None):
        """Hidden states [B, L, H]. segment_ids keep attention inside each packed document;
        without them, attention_mask (1 = token, 0 = padding) works as in transformers.
        token_type_ids: sentence A/B of a pair (fine-tuning); pre-training uses type 0."""
        return self._encode(input_ids, segment_ids, attention_mask, None, token_type_ids)[0]

    def _encode(self, input_ids, segment_ids, attention_mask, cu, token_type_ids=None):
        x = self.bert.embeddings(input_ids, token_type_ids)
        mask = None
        if self.attention == "varlen" and VARLEN is not None and segment_ids is not None and _half_on_cuda(x):
            cu = cu_seqlens(segment_ids) if cu is None else cu.to(x.device, non_blocking=True)
        elif segment_ids is not None:
            mask = document_mask(segment_ids)
        else:
            mask = padding_mask(attention_mask, x.device)
        return self.bert.layers(x, cu, mask)

    def forward(self, input_ids, segment_ids=None, attention_mask=None, labels=None, cu_seqlens=None,
                mlm_index=None):
        """With labels: (loss, number of predictions, number correct), the MLM head run on the
        masked positions only; the loss includes l1 x sum |gate| when the model is gated and l1 > 0.
        Without: logits for every position. cu_seqlens (varlen attention) and mlm_index (the flat
        positions where labels != -100) may come precomputed from the CPU, so that the step has
        no data-dependent shape to read back from the GPU."""
        h, penalty = self._encode(input_ids, segment_ids, attention_mask, cu_seqlens)
        if labels is None:
            return self.cls.predictions(h)
        if mlm_index is None:
            mlm_index = torch.nonzero(labels.reshape(-1) != -100).squeeze(1)
        logits = self.cls.predictions(h.reshape(-1, h.shape[-1]).index_select(0, mlm_index))
        target = labels.reshape(-1).index_select(0, mlm_index)
        loss = F.cross_entropy(logits.float(), target, reduction="sum") / max(target.numel(), 1)
        correct = (logits.argmax(-1) == target).sum()
        if penalty is not None:
            self.last_penalty = penalty.detach()
            if self.l1:
                loss = loss + self.l1 * penalty
        return loss, target.numel(), correct

    # -- EarlyBERT gates
    def gates(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if is_gate(n)]

    def param_groups(self, weight_decay: float, gates_apart: bool = False) -> list[dict]:
        return param_groups(self, weight_decay, gates_apart)

    def num_parameters(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= sum(p.numel() for p in self.bert.embeddings.parameters())
        return n

    def flops(self, tokens: int, attention_pairs: int, predictions: float) -> float:
        """Training FLOPs (forward + backward = 3 x forward) of a batch: the encoder's matmuls over
        `tokens`, attention scores and context over `attention_pairs` (sum over documents of
        length^2: attention stays inside each document), the MLM head on `predictions` tokens."""
        c = self.config
        linear = sum(2 * c.hidden_size * (3 * h * c.head_size) + 2 * h * c.head_size * c.hidden_size
                     + 4 * c.hidden_size * f for h, f in zip(c.heads, c.ffn))
        attention = sum(4 * h * c.head_size for h in c.heads)
        head = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * c.vocab_size
        return 3.0 * (tokens * linear + attention_pairs * attention + predictions * head)

    def flops_per_sequence(self, seq_len: int, masked: float) -> float:
        """flops() of one sequence holding one document, `masked` the predicted fraction."""
        return self.flops(seq_len, seq_len * seq_len, masked * seq_len)
