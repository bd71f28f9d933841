"""Our encoder with a fine-tuning head, under transformers' parameter names, so that the export
(`save`) loads with the matching Auto class: BertForSequenceClassification (or
EarlyBertForSequenceClassification for per-layer sizes) for classification and regression,
...ForQuestionAnswering for SQuAD. The encoder is pipeline/model.py's (gates, pruning and the
EarlyBERT search work on it unchanged); the heads compute what transformers' heads compute."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .hf import export, folded_state_dict, hf_config_dict, load_pretrained, read_state_dict, special_token_ids
from .model import Bert, BertConfig, init_weights, padding_mask
from .tasks import REGRESSION, SQUAD, Task

HEAD_CLASS = {"classification": "ForSequenceClassification", "regression": "ForSequenceClassification",
              "squad": "ForQuestionAnswering"}


class Pooler(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


class TaskModel(nn.Module):
    """`bert` (embeddings, encoder, pooler), then `classifier` (num_labels outputs; 1: regression)
    or `qa_outputs` (start and end logits), with transformers' losses."""

    def __init__(self, config: BertConfig, kind: str, num_labels: int, classifier_dropout: float | None = None):
        super().__init__()
        self.config, self.kind, self.num_labels = config, kind, num_labels
        self.bert = Bert(config)
        self.dropout = nn.Dropout(config.dropout if classifier_dropout is None else classifier_dropout)
        if kind == SQUAD:
            self.qa_outputs = nn.Linear(config.hidden_size, 2)
        else:
            self.bert.pooler = Pooler(config)
            self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.l1 = 0.0  # EarlyBERT's L1 on |gate| (fine-tuning's searching stage), as in BertForMLM
        self.last_penalty = None  # sum |gate| of the last forward (detached), for logging
        self.apply(partial(init_weights, std=config.initializer_range))

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None, start_positions=None,
                end_positions=None):
        """(loss or None, logits): classification [B, num_labels], regression [B], SQuAD
        ([B, L] start, [B, L] end)."""
        x = self.bert.embeddings(input_ids, token_type_ids)
        h, penalty = self.bert.layers(x, None, padding_mask(attention_mask, x.device))
        loss = None
        if self.kind == SQUAD:
            start, end = self.qa_outputs(h).float().unbind(-1)
            logits = (start, end)
            if start_positions is not None:
                loss = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
        else:
            out = self.classifier(self.dropout(self.bert.pooler(h))).float()
            logits = out.squeeze(-1) if self.kind == REGRESSION else out
            if labels is not None:
                loss = (F.mse_loss(logits, labels.float()) if self.kind == REGRESSION
                         else F.cross_entropy(logits, labels))
        if penalty is not None:
            self.last_penalty = penalty.detach()
            if loss is not None and self.l1:
                loss = loss + self.l1 * penalty
        return loss, logits


def from_pretrained(directory: Path, task: Task, gates: bool = False, **overrides) -> TaskModel:
    """The encoder of DIRECTORY (an export of this pipeline, dense or pruned, or a Hugging Face
    BERT) with a new head for TASK; a pooler the checkpoint has (BERT's NSP pooler) is kept.
    overrides: config fields (dropout)."""
    BertConfig.from_json(directory / "config.json")  # a foreign config is reported before weights are read
    theirs = read_state_dict(directory)  # read once: the encoder's weights and the pooler's
    encoder = load_pretrained(directory, weights=theirs, gates=gates, **overrides)
    model = TaskModel(encoder.config, task.kind, task.num_labels)
    state = {k: v for k, v in encoder.state_dict().items() if k.startswith("bert.")}
    for name in ("dense.weight", "dense.bias"):  # with or without the "bert." prefix
        for key in (f"bert.pooler.{name}", f"pooler.{name}"):
            if key in theirs and task.kind != SQUAD:
                state[f"bert.pooler.{name}"] = theirs[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    stray = [k for k in missing if k.startswith("bert.") and not k.startswith("bert.pooler.")] + list(unexpected)
    if stray:
        raise UserError(f"{directory}: weights do not fit the encoder ({stray[:3]})")
    return model


def from_pruned(directory: Path, task: Task, **overrides) -> TaskModel:
    """The ticket the search wrote to RUN/pruned/ (per-layer sizes, gates folded), head included."""
    model = TaskModel(BertConfig.from_json(directory / "config.json", **overrides), task.kind, task.num_labels)
    try:
        model.load_state_dict(read_state_dict(directory))
    except RuntimeError as e:  # missing or unexpected weights, or shapes the config does not give
        raise UserError(f"{directory}: does not hold this task's pruned model ({str(e).splitlines()[0][:200]})") from None
    return model


def hf_task_config(model: TaskModel, task: Task, tokenizer_dir: Path) -> dict:
    """config.json of the fine-tuned model: the encoder's (plain bert or earlybert with its
    auto_map), the head's architecture, labels and problem type."""
    d = hf_config_dict(model.config, special_token_ids(tokenizer_dir))
    prefix = "EarlyBert" if d["model_type"] == "earlybert" else "Bert"
    d["architectures"] = [prefix + HEAD_CLASS[model.kind]]
    if model.kind != SQUAD:
        names = task.labels if model.kind != REGRESSION else ["LABEL_0"]
        d.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
                 num_labels=model.num_labels,
                 problem_type="regression" if model.kind == REGRESSION else "single_label_classification")
    return d


def save(model: TaskModel, task: Task, out: Path, tokenizer_dir: Path, weights: dict | None = None) -> None:
    """OUT as transformers reads it (gates folded), through OUT.tmp renamed into place. weights:
    the model's fp32 weights when the module's own are not (DeepSpeed's bf16, ZeRO partitions)."""
    export(model, out, tokenizer_dir, folded_state_dict(model, weights), None, hf_task_config(model, task, tokenizer_dir))
