"""Fine-tuning tasks read from disk into plain examples, every problem a UserError naming the file
(and line): GLUE in its original layout, SQuAD v1.1/v2.0 JSON, and any CSV or JSONL of labeled
text. Each task knows its labels, its dev sets and its official metrics (pipeline/task_metrics.py).

    glue:NAME      cola sst2 mrpc stsb qqp mnli qnli rte wnli, from DATA_DIR/<GLUE dir>/train.tsv and
                   dev.tsv (MNLI: dev_matched.tsv and dev_mismatched.tsv, both evaluated)
    squad:v1       DATA_DIR/train-v1.1.json, dev-v1.1.json;  squad:v2: train-v2.0.json, dev-v2.0.json
    csv:PATH       --text_fields a[,b] --label_field y, with --dev PATH or a seeded --dev_fraction;
    jsonl:PATH     numeric labels that are not class ids make a regression (--task_type says so)

GLUE's TSVs are read as the original GLUE processors read them (tab-separated, no quoting); QQP's
train.tsv has a few rows with missing columns, which the processors skip: they are skipped and
counted here too, every other short row is an error.
"""
from __future__ import annotations

import csv
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .settings import check_value, field_of, json_object

CLASSIFICATION, REGRESSION, SQUAD = "classification", "regression", "squad"


@dataclass
class Example:
    texts: tuple[str, ...]       # one text, or a pair
    label: int | float | None    # a class id, a number (regression), None (unlabeled)
    id: str                      # file:line, or the file's own id


@dataclass
class SquadExample:
    id: str
    question: str
    context: str
    answers: list[str]           # gold answer texts (empty: unanswerable, SQuAD v2.0)
    starts: list[int]            # each answer's character offset in the context


@dataclass
class Task:
    name: str
    kind: str                               # CLASSIFICATION, REGRESSION or SQUAD
    labels: list[str]                       # class names (classification), their ids' order
    metrics: tuple[str, ...]                # what task_metrics reports for it, the first the main one
    train: list = field(default_factory=list)
    dev: dict[str, list] = field(default_factory=dict)  # dev set name -> examples
    notes: list[str] = field(default_factory=list)      # what reading skipped, said once

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == REGRESSION else len(self.labels)


@dataclass(frozen=True)
class GlueSpec:
    directory: str
    texts: tuple[str | int, ...]      # header names, or column numbers for CoLA (no header)
    label: str | int
    labels: tuple[str, ...] | None    # None: regression
    metrics: tuple[str, ...]
    dev: tuple[str, ...] = ("dev",)
    header: bool = True


GLUE = {
    "cola": GlueSpec("CoLA", (3,), 1, ("0", "1"), ("matthews", "accuracy"), header=False),
    "sst2": GlueSpec("SST-2", ("sentence",), "label", ("0", "1"), ("accuracy",)),
    "mrpc": GlueSpec("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("f1", "accuracy")),
    "stsb": GlueSpec("STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman")),
    "qqp": GlueSpec("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("f1", "accuracy")),
    "mnli": GlueSpec("MNLI", ("sentence1", "sentence2"), "gold_label", ("contradiction", "entailment", "neutral"),
                     ("accuracy",), dev=("dev_matched", "dev_mismatched")),
    "qnli": GlueSpec("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), ("accuracy",)),
    "rte": GlueSpec("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": GlueSpec("WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), ("accuracy",)),
}
SQUAD_FILES = {"v1": ("train-v1.1.json", "dev-v1.1.json"), "v2": ("train-v2.0.json", "dev-v2.0.json")}
TASK_KINDS = "glue:NAME, squad:v1, squad:v2, csv:PATH or jsonl:PATH"


@dataclass
class TaskArgs:
    """What a task spec needs beyond its name (the fine-tuning command's flags)."""
    data_dir: Path | None = None
    text_fields: tuple[str, ...] = ()
    label_field: str | None = None
    dev: Path | None = None
    dev_fraction: float | None = None
    task_type: str | None = None  # classification or regression; None: from the labels
    seed: int = 0


def load_task(spec: str, a: TaskArgs) -> Task:
    """The task SPEC names, read whole (bad input: UserError before anything is written)."""
    kind, _, name = spec.partition(":")
    if kind == "glue":
        if name not in GLUE:
            raise UserError(f"--task {spec}: unknown GLUE task (one of {', '.join(GLUE)})")
        return read_glue(name, _need_data_dir(spec, a))
    if kind == "squad":
        if name not in SQUAD_FILES:
            raise UserError(f"--task {spec}: squad:v1 or squad:v2")
        d = _need_data_dir(spec, a)
        train, dev = (d / f for f in SQUAD_FILES[name])
        task = Task(spec, SQUAD, [], ("exact_match", "f1"), read_squad(train, name == "v2"),
                    {"dev": read_squad(dev, name == "v2")})
        return task
    if kind in ("csv", "jsonl") and name:
        return read_table(spec, Path(name), kind, a)
    raise UserError(f"--task {spec}: unknown task (one of {TASK_KINDS})")


def _need_data_dir(spec: str, a: TaskArgs) -> Path:
    if a.data_dir is None:
        raise UserError(f"--task {spec}: give --data_dir, the directory holding the task's files "
                        "(the Hugging Face hub is not read by this version)")
    if not a.data_dir.is_dir():
        raise UserError(f"--data_dir {a.data_dir}: not a directory")
    return a.data_dir


# -- GLUE

def _read_text(path: Path, missing: str = "missing") -> str:
    """PATH's UTF-8 text (a BOM dropped); UserError naming it when absent or unreadable."""
    if not path.is_file():
        raise UserError(f"{path}: {missing}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({e})") from None


def _tsv_rows(path: Path) -> list[list[str]]:
    text = _read_text(path, "missing (GLUE's layout: DATA_DIR/<task dir>/train.tsv, dev.tsv)")
    csv.field_size_limit(sys.maxsize)
    return list(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))


def read_glue(name: str, data_dir: Path) -> Task:
    g = GLUE[name]
    task = Task(f"glue:{name}", REGRESSION if g.labels is None else CLASSIFICATION, list(g.labels or []), g.metrics)
    task.train = _read_glue_file(data_dir / g.directory / "train.tsv", g, task)
    task.dev = {split: _read_glue_file(data_dir / g.directory / f"{split}.tsv", g, task) for split in g.dev}
    return task


def _read_glue_file(path: Path, g: GlueSpec, task: Task) -> list[Example]:
    rows = _tsv_rows(path)
    if g.header:
        if not rows:
            raise UserError(f"{path}: empty (expected a header line)")
        header, rows, first = rows[0], rows[1:], 2
        missing = [c for c in (*g.texts, g.label) if c not in header]
        if missing:
            raise UserError(f"{path}: header has no column {missing[0]!r} (it has {', '.join(header[:12])})")
        cols = [header.index(c) for c in g.texts], header.index(g.label)
    else:
        cols, first = (list(g.texts), g.label), 1
    width = max(*cols[0], cols[1]) + 1
    out, short = [], 0
    for n, row in enumerate(rows, first):
        if not row:
            continue
        if len(row) < width:
            if g.directory == "QQP":  # as GLUE's own processor: a few broken rows are skipped
                short += 1
                continue
            raise UserError(f"{path}:{n}: {len(row)} columns, expected at least {width}")
        label = _glue_label(row[cols[1]], g, f"{path}:{n}")
        out.append(Example(tuple(row[c] for c in cols[0]), label, f"{path.name}:{n}"))
    if short:
        task.notes.append(f"{path}: skipped {short} row(s) with missing columns (as GLUE's processor does)")
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def _glue_label(value: str, g: GlueSpec, where: str) -> int | float:
    if g.labels is None:
        try:
            x = float(value)
        except ValueError:
            x = math.nan
        if not math.isfinite(x):
            raise UserError(f"{where}: label {value!r} is not a number")
        return x
    if value not in g.labels:
        raise UserError(f"{where}: label {value!r} is not one of the task's ({', '.join(g.labels)})")
    return g.labels.index(value)


# -- SQuAD

def read_squad(path: Path, v2: bool) -> list[SquadExample]:
    """Every question of a SQuAD file; answers' offsets must point at their text in the context.
    v1.1 files must not hold unanswerable questions (v2.0's `is_impossible`)."""
    if not path.is_file():
        raise UserError(f"{path}: missing")
    d = json_object(path)
    out, seen = [], set()
    for i, article in enumerate(field_of(d, "data", list, str(path))):
        where = f"{path}: data[{i}]"
        article = check_value(article, dict, where)
        for j, para in enumerate(field_of(article, "paragraphs", list, where)):
            pw = f"{where}.paragraphs[{j}]"
            para = check_value(para, dict, pw)
            context = field_of(para, "context", str, pw)
            for k, qa in enumerate(field_of(para, "qas", list, pw)):
                qw = f"{pw}.qas[{k}]"
                qa = check_value(qa, dict, qw)
                qid = str(field_of(qa, "id", (str, int), qw))
                if qid in seen:
                    raise UserError(f"{qw}: question id {qid!r} appears twice")
                seen.add(qid)
                impossible = field_of(qa, "is_impossible", bool, qw, default=False)
                if impossible and not v2:
                    raise UserError(f"{qw}: an unanswerable question (is_impossible) in a SQuAD v1.1 task: "
                                    "use squad:v2")
                texts, starts = [], []
                for m, ans in enumerate([] if impossible else field_of(qa, "answers", list, qw)):
                    aw = f"{qw}.answers[{m}]"
                    ans = check_value(ans, dict, aw)
                    text = field_of(ans, "text", str, aw)
                    start = field_of(ans, "answer_start", int, aw, low=0)
                    if context[start:start + len(text)] != text:
                        raise UserError(f"{aw}: answer_start {start} does not point at {text[:40]!r} in the context")
                    texts.append(text)
                    starts.append(start)
                if not texts and not impossible:
                    raise UserError(f"{qw}: no answers and not is_impossible")
                out.append(SquadExample(qid, field_of(qa, "question", str, qw), context, texts, starts))
    if not out:
        raise UserError(f"{path}: no questions")
    return out


# -- CSV and JSONL

def _table_rows(path: Path, kind: str) -> list[tuple[str, dict]]:
    """(where, row) for each record of a CSV (with a header) or JSONL file."""
    text = _read_text(path)
    if kind == "csv":
        csv.field_size_limit(sys.maxsize)
        try:
            reader = csv.DictReader(text.splitlines())
            rows = [(f"{path}:{reader.line_num}", row) for row in reader]
        except csv.Error as e:
            raise UserError(f"{path}: not CSV ({e})") from None
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise UserError(f"{path}:{n}: not JSON ({type(e).__name__}: {str(e)[:100]})") from None
        rows.append((f"{path}:{n}", check_value(row, dict, f"{path}:{n}")))
    return rows


def _table_examples(path: Path, kind: str, a: TaskArgs) -> list[tuple[str, tuple[str, ...], object]]:
    if not a.text_fields or a.label_field is None:
        raise UserError(f"--task {kind}:{path}: give --text_fields a[,b] and --label_field")
    out = []
    for where, row in _table_rows(path, kind):
        for f in (*a.text_fields, a.label_field):
            if f not in row or row[f] is None:
                raise UserError(f"{where}: no field {f!r}")
        texts = tuple(check_value(row[f], str, f"{where}: field {f!r}") for f in a.text_fields)
        label = check_value(row[a.label_field], (str, int, float, bool), f"{where}: field {a.label_field!r}")
        out.append((where, texts, label))
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def _is_number(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return math.isfinite(v)
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


def _label_key(v) -> str:
    """A label as a class name: numbers by value (1, "1" and 1.0 are one class), text as is."""
    if _is_number(v):
        x = float(v)
        return str(int(x)) if x.is_integer() else repr(x)
    return str(v)


def read_table(spec: str, path: Path, kind: str, a: TaskArgs) -> Task:
    """A CSV/JSONL task: classes are the distinct labels of the training file, sorted (numbers
    numerically), unless they are numbers that are not class ids (or --task_type regression)."""
    rows = _table_examples(path, kind, a)
    dev_rows = _table_examples(a.dev, kind, a) if a.dev else None
    if a.dev is None:
        if a.dev_fraction is None or not 0 < a.dev_fraction < 1:
            raise UserError(f"--task {spec}: give --dev PATH or --dev_fraction in (0, 1)")
        order = list(range(len(rows)))
        random.Random(a.seed).shuffle(order)
        n_dev = max(1, round(a.dev_fraction * len(rows)))
        if n_dev >= len(rows):
            raise UserError(f"{path}: {len(rows)} example(s) cannot be split by --dev_fraction {a.dev_fraction}")
        dev_set = set(order[:n_dev])
        dev_rows = [r for i, r in enumerate(rows) if i in dev_set]
        rows = [r for i, r in enumerate(rows) if i not in dev_set]
    labels = [lab for _, _, lab in rows]
    numeric = all(_is_number(v) for v in labels)
    values = sorted({float(v) for v in labels}) if numeric else []
    is_ids = numeric and values == list(range(len(values)))
    kind_ = a.task_type or (REGRESSION if numeric and not is_ids else CLASSIFICATION)
    if kind_ not in (CLASSIFICATION, REGRESSION):
        raise UserError(f"--task_type {kind_}: classification or regression")
    if kind_ == REGRESSION:
        bad = next(((w, v) for w, _, v in rows + dev_rows if not _is_number(v)), None)
        if bad:
            raise UserError(f"{bad[0]}: label {bad[1]!r} is not a number (a regression task)")
        task = Task(spec, REGRESSION, [], ("pearson", "spearman"))
        task.train = [Example(t, float(v), w) for w, t, v in rows]
        task.dev = {"dev": [Example(t, float(v), w) for w, t, v in dev_rows]}
        return task
    # class names: the distinct training labels, numbers in numeric order ("1" and 1.0 are one class)
    names = [_label_key(v) for v in values] if numeric else sorted({_label_key(v) for v in labels})
    if len(names) < 2:
        raise UserError(f"{path}: one label ({names[0]!r}) in the training examples: nothing to classify")

    def label_id(where, v) -> int:
        key = _label_key(v)
        if key not in names:
            raise UserError(f"{where}: label {v!r} is not among the training labels ({', '.join(names[:10])})")
        return names.index(key)

    metrics = ("accuracy", "f1") if len(names) == 2 else ("accuracy",)
    task = Task(spec, CLASSIFICATION, names, metrics)
    task.train = [Example(t, label_id(w, v), w) for w, t, v in rows]
    task.dev = {"dev": [Example(t, label_id(w, v), w) for w, t, v in dev_rows]}
    return task
