"""Every training and EarlyBERT search setting: typed, with its help text and its checks in one place.

`TrainSettings` is what `python -m pipeline.train` takes; `SearchSettings` is the EarlyBERT search
(gate L1, snapshots, the early-bird rule, the ticket and what the efficient stage does with it),
shared by the trainer, the monitor (which reads it back from RUN/search.json) and fine-tuning.
Each field's `help` is its documentation and its `--help` line; the flag is the field's name.
Batch sizes, precision, optimizer, scheduler and ZeRO stage are DeepSpeed's: they live in the
DeepSpeed config, not here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipeline.errors import UserError

DEFAULT_FFN_MULTIPLE = 64


def setting(default=dataclasses.MISSING, help: str = "", **argparse_kw):
    """A field with its documentation (`help`) and, where needed, argparse extras (choices)."""
    return field(default=default, metadata={"help": help, **argparse_kw})


def _at_least(name: str, value, low) -> None:
    if value is not None and value < low:
        raise UserError(f"--{name} {value}: must be at least {low}")


def _fraction(name: str, value) -> None:
    if value is not None and not 0.0 <= value < 1.0:
        raise UserError(f"--{name} {value}: must be in [0, 1)")


# ------------------------------------------------------------------ JSON files: typed reads

INT64 = 2 ** 63  # an integer field must fit int64: numpy and torch hold every count and step in it
_REQUIRED = object()
_KIND_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "an integer",
               float: "a number", None: "null"}


def json_kind(value) -> str:
    """How a JSON value is named in messages: 'a list', 'null', 'an integer' ..."""
    return _KIND_NAMES.get(None if value is None else type(value), type(value).__name__)


def read_json(path: Path | str, where: str | None = None):
    """PATH's JSON value, or UserError prefixed with `where` (default: the path) when the file
    cannot be read, is not UTF-8 (or UTF-16/32) text, is not JSON or nests deeper than the parser."""
    where = where or str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{where}: cannot be read ({e.strerror or e})") from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def json_object(path: Path | str, where: str | None = None) -> dict:
    """read_json, which must give a JSON object."""
    where = where or str(path)
    d = read_json(path, where)
    if not isinstance(d, dict):
        raise UserError(f"{where}: holds {json_kind(d)}, expected a JSON object")
    return d


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_value(value, kinds, what: str, low=None, high=None, choices=None):
    """`value` (called `what` in messages) must be one of `kinds`: dict, list, str, bool, int
    (not a bool, within int64), float (any finite number, integers too) or None (null); numbers
    within [low, high], strings among `choices`. Returns it unchanged."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    ok = False
    for k in kinds:
        if k is None:
            ok = value is None
        elif k is int or k is float:
            ok = isinstance(value, (int, float) if k is float else int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, k)
        if ok:
            break
    if not ok:
        raise UserError(f"{what} is {json_kind(value)}, expected {' or '.join(_KIND_NAMES[k] for k in kinds)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{what} is {value}, expected a finite number")
    if isinstance(value, int) and not isinstance(value, bool):
        if int in kinds and not -INT64 <= value < INT64:
            raise UserError(f"{what} is {_short(value)}, out of range")
        if float in kinds and abs(value) > 2 ** 1000:  # where a float is taken, it must convert
            raise UserError(f"{what} is {_short(value)}, out of range")
    if low is not None and isinstance(value, (int, float)) and value < low:
        raise UserError(f"{what} is {value}, must be at least {low}")
    if high is not None and isinstance(value, (int, float)) and value > high:
        raise UserError(f"{what} is {value}, must be at most {high}")
    if choices is not None and value not in choices:
        raise UserError(f"{what} is {_short(value)}, expected one of {', '.join(map(str, choices))}")
    return value


def field_of(d: dict, key: str, kinds, where: str, default=_REQUIRED, **limits):
    """d[key] checked by check_value (messages: "WHERE: field 'KEY' is a list, expected ...");
    a missing key gives `default`, or UserError when there is none."""
    if key not in d:
        if default is _REQUIRED:
            raise UserError(f"{where}: field {key!r} is missing")
        return default
    return check_value(d[key], kinds, f"{where}: field {key!r}", **limits)


def int_list(d: dict, key: str, where: str, low=None, default=_REQUIRED) -> list[int]:
    """d[key]: a non-empty list of integers, each at least `low`."""
    items = field_of(d, key, list, where, default=default)
    if items is default and key not in d:
        return items
    if not items:
        raise UserError(f"{where}: field {key!r} is an empty list")
    for i, v in enumerate(items):
        check_value(v, int, f"{where}: field {key!r} item {i}", low=low)
    return items


@dataclass
class SearchSettings:
    """The EarlyBERT search: what the trainer does while searching, the rule the monitor applies,
    the ticket drawn from it and how the efficient stage starts (see shared/EARLYBERT.md)."""
    l1: float = setting(1e-4, "L1 coefficient on |gate|, applied once per optimizer step whatever the "
                              "gradient accumulation")
    gate_lr: str = setting("peak", "the gates' LR while searching: peak: the optimizer's peak LR (the scheduler's "
                                   "warmup_max_lr, else the optimizer's lr) from the first step, constant, so a "
                                   "search shorter than the LR warm-up still moves them; schedule: the model's LR "
                                   "schedule, as every parameter", choices=("peak", "schedule"))
    snapshot_every: int = setting(10, "steps between gate snapshots (RUN/gates/)")
    search_min_steps: int = setting(100, "the early-bird rule does not fire before this step")
    search_max_steps: int = setting(400, "no ticket by then: the trainer draws it from its own gates")
    prune_heads: int | None = setting(None, "heads dropped per layer (default 4 of 12, else a third)")
    prune_ffn: float = setting(0.3, "fraction of FFN neurons dropped, globally")
    ffn_multiple: int | None = setting(
        None, f"keep every layer's FFN width a multiple of this (default {DEFAULT_FFN_MULTIPLE}; 1: the "
              "paper's free widths, which on an H100 made a ticket slower than the dense model); a "
              "resumed search keeps the value it began with")
    window: int = setting(5, "the early-bird rule: masks compared (the newest and the ones before it)")
    epsilon: float = setting(0.1, "the early-bird rule: the largest mask distance that counts as stable")
    tie_margin: float = setting(0.01, "the early-bird rule: a |gate| within this fraction of the gates' spread of "
                                      "the selection boundary is a near-tie; the rule does not fire while more "
                                      "than --epsilon of the heads or FFN neurons are (0: no such check)")
    ticket: str = setting("rule", "random: a seeded random ticket of the rule's shape (a baseline)",
                          choices=("rule", "random"))
    ticket_weights: str = setting("carry", "carry: searched weights, gates folded; rewind: the weights "
                                           "before the search", choices=("carry", "rewind"))
    rewarmup_steps: int = setting(0, "efficient stage: ramp the LR up again over this many steps")

    def check(self) -> None:
        for name in ("snapshot_every", "search_max_steps", "ffn_multiple"):
            _at_least(name, getattr(self, name), 1)
        _fraction("prune_ffn", self.prune_ffn)
        if self.prune_heads is not None and self.prune_heads < 0:
            raise UserError(f"--prune_heads {self.prune_heads}: must be >= 0")
        if self.l1 < 0:
            raise UserError(f"--l1 {self.l1}: must be >= 0")
        if self.window < 2:
            raise UserError(f"--window {self.window}: must be at least 2")
        if not 0.0 < self.epsilon <= 1.0:
            raise UserError(f"--epsilon {self.epsilon}: must be in (0, 1]")
        _fraction("tie_margin", self.tie_margin)
        if isinstance(self.ffn_multiple, bool) or (self.ffn_multiple is not None
                                                   and not isinstance(self.ffn_multiple, int)):
            raise UserError(f"ffn_multiple {self.ffn_multiple!r} must be an integer >= 1")

    def check_model(self, heads: list[int]) -> None:
        """Against the model's heads per layer: at least one head must stay in every layer."""
        if self.prune_heads is not None and any(self.prune_heads >= h for h in heads):
            raise UserError(f"--prune_heads {self.prune_heads}: the model has {min(heads)} heads in a layer; "
                            "at least one must stay")

    @staticmethod
    def finetune_defaults() -> dict:
        """The fine-tuning preset (the paper's fine-tuning protocol): 40 % of FFN neurons pruned
        (heads: 4 of 12, as in pre-training), the ticket rewound to the pre-trained weights; the
        search's length and snapshot interval follow from --search_fraction of the first epoch
        (None: resolved by `for_search_length`), the rule may fire once its window is full; the gates
        follow fine-tuning's own LR schedule (no --gate_lr flag)."""
        return {"prune_ffn": 0.4, "ticket_weights": "rewind", "search_min_steps": 0,
                "search_max_steps": None, "snapshot_every": None, "gate_lr": "schedule"}

    def for_search_length(self, steps: int) -> "SearchSettings":
        """Fine-tuning's settings in force: an unset search length (the fallback step) set to
        STEPS, an unset snapshot interval to a tenth of it, an unset FFN multiple to the default
        (RUN/run.json records the result: a rerun cannot change them)."""
        return dataclasses.replace(self, search_max_steps=self.search_max_steps or steps,
                                   snapshot_every=self.snapshot_every or max(1, steps // 10),
                                   ffn_multiple=self.ffn_multiple or DEFAULT_FFN_MULTIPLE)

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def legacy_names(cls, record: dict) -> dict:
        """A record's settings under today's field names (min_steps, max_steps: before the flags'
        names were used); other keys dropped."""
        known = {f.name for f in fields(cls)}
        legacy = {"min_steps": "search_min_steps", "max_steps": "search_max_steps"}
        return {legacy.get(k, k): v for k, v in record.items() if legacy.get(k, k) in known}

    @classmethod
    def from_record(cls, record: dict, where: str) -> "SearchSettings":
        """From RUN/search.json. A file written before a setting existed gets the value that
        reproduces what that run did: ffn_multiple 1 (free widths), tie_margin 0 (no near-tie
        check), gate_lr schedule (the gates followed the model's LR), and the older names min_steps
        and max_steps for the search's bounds."""
        if not isinstance(record, dict):
            raise UserError(f"{where}: holds {json_kind(record)}, expected a JSON object")
        values = cls.legacy_names(record)
        values.setdefault("ffn_multiple", 1)
        values.setdefault("tie_margin", 0.0)  # a search begun before near-ties were counted
        values.setdefault("gate_lr", "schedule")  # ... or before the gates had an LR of their own
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name not in values:
                continue
            # The field's type (int | None: null allowed); a record's ffn_multiple is the resolved one.
            hint = int if f.name == "ffn_multiple" else hints[f.name]
            kinds = tuple(None if a is type(None) else a for a in typing.get_args(hint)) or hint
            check_value(values[f.name], kinds, f"{where}: field {f.name!r}", choices=f.metadata.get("choices"))
        try:
            s = cls(**values)
            s.check()
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        return s


@dataclass
class TrainSettings:
    """`python -m pipeline.train`: where the data and the run are, what model, how long, and the
    loop's intervals. The stage (search, efficient, dense) comes from RUN, not from here."""
    data: Path = setting(help="a data_prep output directory")
    run_dir: Path = setting(help="the run directory (RUN): the only state of a run")
    model: str = setting(help="a preset (bert-tiny ... bert-large) or a JSON model config")
    max_steps: int = setting(help="optimizer steps in all, both stages together")
    deepspeed_config: Path = setting(help="the DeepSpeed JSON config (batch sizes, precision, optimizer, ZeRO)")
    seed: int = setting(0, "seeds the model's initialisation, the data order and the masking")
    dropout: float | None = setting(None, "hidden and attention dropout (default 0.1)")
    attention_dropout: float | None = setting(None, "attention dropout alone (default: --dropout's, else 0.1)")
    attention: str = setting("sdpa", "sdpa: block-diagonal mask (any device, dropout honoured); varlen: "
                                     "variable-length flash attention on CUDA (torch's kernel needs "
                                     "--attention_dropout 0)", choices=("sdpa", "varlen"))
    compile: bool = setting(False, "torch.compile the model (not with ZeRO-3)")
    prefetch: int = setting(4, "micro batches prepared ahead by the loader process")
    checkpoint_every: int = setting(1000, "steps between checkpoints")
    keep_checkpoints: int = setting(3, "checkpoints kept (the oldest go)")
    eval_every: int = setting(1000, "steps between validations (0: only at the end)")
    eval_sequences: int = setting(4096, "validation sequences per evaluation")
    log_every: int = setting(1, "steps between metrics rows")
    max_time: float | None = setting(None, "seconds this launch may take, its start-up included: "
                                                   "checkpoint and stop (exit 75) before they run out")
    init_from: Path | None = setting(None, "a Hugging Face BERT checkpoint directory")
    mlm_probability: float = setting(0.15, "fraction of tokens predicted")
    whole_word_masking: bool = setting(False, "mask whole words (needs the data's tokenizer)")
    wandb_project: str | None = setting(None, "W&B project (none: no W&B)")
    wandb_group: str | None = setting(None, "W&B group (default earlybert-<run id>)")
    wandb_entity: str | None = setting(None, "W&B entity (user or team; default your default entity)")
    wandb_mode: str | None = setting(None, "W&B mode (default: $WANDB_MODE)",
                                     choices=("online", "offline", "disabled"))
    earlybird: str = setting("on", "on: search with gates, draw the ticket, train it; off: the dense model",
                             choices=("on", "off"))

    def check(self) -> None:
        for name in ("max_steps", "checkpoint_every", "prefetch"):
            _at_least(name, getattr(self, name), 1)
        for name in ("dropout", "attention_dropout"):
            _fraction(name, getattr(self, name))

    def dropout_overrides(self) -> dict:
        return dropout_overrides(self.dropout, self.attention_dropout)


def dropout_overrides(dropout: float | None, attention_dropout: float | None = None) -> dict:
    """The model config's dropout fields that --dropout (hidden and attention) and
    --attention_dropout override."""
    over = {} if dropout is None else {"dropout": dropout, "attention_dropout": dropout}
    if attention_dropout is not None:
        over["attention_dropout"] = attention_dropout
    return over


@dataclass
class FinetuneSettings:
    """`python -m pipeline.finetune`: a pre-trained model, a task, and how to fine-tune it (the
    defaults are BERT's GLUE recipe: 3 epochs, lr 2e-5, batch 32, 10 % warm-up)."""
    model: Path = setting(help="an export of this pipeline (dense or pruned) or a Hugging Face BERT directory "
                               "(with its tokenizer)")
    task: str = setting(help="glue:NAME, squad:v1, squad:v2, csv:PATH or jsonl:PATH")
    out: Path = setting(help="the fine-tuning run directory (RUN): metrics, checkpoint, results.json, final/")
    data_dir: Path | None = setting(None, "the task's files (GLUE's layout, SQuAD's JSON files)")
    epochs: int = setting(3, "passes over the training set")
    lr: float = setting(2e-5, "peak learning rate (AdamW)")
    batch_size: int = setting(32, "examples per optimizer step, all processes together")
    max_seq_len: int = setting(128, "tokens per example (longer ones are truncated; SQuAD: window length)")
    doc_stride: int = setting(128, "SQuAD: tokens of overlap between a long context's windows")
    seed: int = setting(0, "seeds the head's initialisation, the data order and dropout")
    warmup: float = setting(0.1, "fraction of the steps with a linear warm-up (then linear decay to 0)")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    eval_batch_size: int = setting(64, "examples per evaluation batch")
    dropout: float | None = setting(None, "hidden, attention and classifier dropout (default: the model's, BERT's 0.1)")
    deepspeed_config: Path | None = setting(None, "train through DeepSpeed with this config (its precision, ZeRO "
                                                  "stage and gradient clipping; AdamW and the schedule stay "
                                                  "fine-tuning's); default: plain PyTorch")
    text_fields: str | None = setting(None, "csv/jsonl: the text field, or two comma-separated for pairs")
    label_field: str | None = setting(None, "csv/jsonl: the label field")
    dev: Path | None = setting(None, "csv/jsonl: the dev file (same format)")
    dev_fraction: float | None = setting(None, "csv/jsonl without --dev: a seeded fraction held out")
    task_type: str | None = setting(None, "csv/jsonl: classification or regression (default: from the labels)",
                                    choices=("classification", "regression"))
    log_every: int = setting(10, "steps between metrics rows")
    earlybird: str = setting("off", "on: EarlyBERT during fine-tuning (gates and L1 over --search_fraction of the "
                                    "first epoch, the ticket, then the ticket fine-tuned); off: dense fine-tuning",
                             choices=("on", "off"))
    search_fraction: float = setting(0.2, "--earlybird on: the searching stage's length, a fraction of the first "
                                          "epoch (see --search_floor_steps)")
    search_floor_steps: int = setting(50, "--earlybird on: a search shorter than this many steps is raised to it, "
                                          "or to half the first epoch if that is less: a fraction of a small task's "
                                          "epoch is too few steps for the gates to part (bench/RESULTS.md); 0: the "
                                          "fraction alone")
    ticket_epochs: int = setting(2, "--earlybird on: epochs the ticket is fine-tuned for (the paper: 2, dense 3)")
    ticket_lr_scale: float = setting(2.0, "--earlybird on: the ticket's LR is --lr times this (the paper: 2)")
    wandb_project: str | None = setting(None, "W&B project (none: no W&B)")
    wandb_group: str | None = setting(None, "W&B group")
    wandb_entity: str | None = setting(None, "W&B entity")
    wandb_mode: str | None = setting(None, "W&B mode (default: $WANDB_MODE)", choices=("online", "offline", "disabled"))

    def check(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            _at_least(name, getattr(self, name), 1)
        _at_least("max_seq_len", self.max_seq_len, 16)
        _at_least("doc_stride", self.doc_stride, 1)
        _fraction("warmup", self.warmup)
        _fraction("dropout", self.dropout)
        if not self.lr > 0:
            raise UserError(f"--lr {self.lr}: must be > 0")
        if self.weight_decay < 0:
            raise UserError(f"--weight_decay {self.weight_decay}: must be >= 0")
        if self.dev_fraction is not None and not 0 < self.dev_fraction < 1:
            raise UserError(f"--dev_fraction {self.dev_fraction}: must be in (0, 1)")
        if not 0 < self.search_fraction <= 1:
            raise UserError(f"--search_fraction {self.search_fraction}: must be in (0, 1]")
        _at_least("ticket_epochs", self.ticket_epochs, 1)
        _at_least("search_floor_steps", self.search_floor_steps, 0)
        if not self.ticket_lr_scale > 0:
            raise UserError(f"--ticket_lr_scale {self.ticket_lr_scale}: must be > 0")

    def identity(self) -> dict:
        """What a rerun must match to continue RUN (the logging flags may change)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()
                if k not in ("out", "log_every", "eval_batch_size") and not k.startswith("wandb_")}

    def dropout_overrides(self) -> dict:
        return dropout_overrides(self.dropout)


# ------------------------------------------------------------------ command lines from the classes

def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                  skip: tuple[str, ...] = ()) -> None:
    """One flag per field: --name, its type, default, choices and help."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        kw = {k: v for k, v in f.metadata.items() if k != "help"}
        kw["help"] = f.metadata.get("help", "")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", **kw)
            continue
        args = typing.get_args(kind)
        kw["type"] = next(a for a in args if a is not type(None)) if args else kind
        if f.default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        parser.add_argument(f"--{f.name}", **kw)


def check_or_exit(parser: argparse.ArgumentParser, *settings) -> None:
    """Each settings object's check(); a failure is a usage error of PARSER (exit 2)."""
    for one in settings:
        try:
            one.check()
        except UserError as e:
            parser.error(str(e))


def from_namespace(cls: type, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})
