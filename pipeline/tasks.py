"""Fine-tuning tasks read from disk into plain examples, every problem a UserError naming the file
(and line): GLUE in its original layout, SQuAD v1.1/v2.0 JSON, and any CSV or JSONL of labeled
text. Each task knows its labels, its dev sets and its official metrics (pipeline/task_metrics.py).

    glue:NAME      cola sst2 mrpc stsb qqp mnli qnli rte wnli, from DATA_DIR/<GLUE dir>/train.tsv and
                   dev.tsv (MNLI: dev_matched.tsv and dev_mismatched.tsv, both evaluated)
    squad:v1       DATA_DIR/train-v1.1.json, dev-v1.1.json;  squad:v2: train-v2.0.json, dev-v2.0.json
                   (GLUE and SQuAD without a DATA_DIR: the Hugging Face hub's nyu-mll/glue,
                   rajpurkar/squad and rajpurkar/squad_v2, or their copy in the local datasets cache)
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
    hub: tuple[str, ...]              # the text columns in the hub's nyu-mll/glue
    dev: tuple[str, ...] = ("dev",)
    header: bool = True


P2 = ("sentence1", "sentence2")
GLUE = {
    "cola": GlueSpec("CoLA", (3,), 1, ("0", "1"), ("matthews", "accuracy"), ("sentence",), header=False),
    "sst2": GlueSpec("SST-2", ("sentence",), "label", ("0", "1"), ("accuracy",), ("sentence",)),
    "mrpc": GlueSpec("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("f1", "accuracy"), P2),
    "stsb": GlueSpec("STS-B", P2, "score", None, ("pearson", "spearman"), P2),
    "qqp": GlueSpec("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("f1", "accuracy"),
                    ("question1", "question2")),
    "mnli": GlueSpec("MNLI", P2, "gold_label", ("contradiction", "entailment", "neutral"), ("accuracy",),
                     ("premise", "hypothesis"), dev=("dev_matched", "dev_mismatched")),
    "qnli": GlueSpec("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), ("accuracy",),
                     ("question", "sentence")),
    "rte": GlueSpec("RTE", P2, "label", ("entailment", "not_entailment"), ("accuracy",), P2),
    "wnli": GlueSpec("WNLI", P2, "label", ("0", "1"), ("accuracy",), P2),
}
SQUAD_FILES = {"v1": ("train-v1.1.json", "dev-v1.1.json"), "v2": ("train-v2.0.json", "dev-v2.0.json")}
HUB = {"glue": "nyu-mll/glue", "v1": "rajpurkar/squad", "v2": "rajpurkar/squad_v2"}
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
        if a.data_dir is None:
            return glue_from_hub(name, load_hub(HUB["glue"], name, spec))
        return read_glue(name, _data_dir(a))
    if kind == "squad":
        if name not in SQUAD_FILES:
            raise UserError(f"--task {spec}: squad:v1 or squad:v2")
        if a.data_dir is None:
            return squad_from_hub(name, load_hub(HUB[name], None, spec))
        d = _data_dir(a)
        train, dev = (d / f for f in SQUAD_FILES[name])
        task = Task(spec, SQUAD, [], ("exact_match", "f1"), read_squad(train, name == "v2"),
                    {"dev": read_squad(dev, name == "v2")})
        return task
    if kind in ("csv", "jsonl") and name:
        return read_table(spec, Path(name), kind, a)
    raise UserError(f"--task {spec}: unknown task (one of {TASK_KINDS})")


def _data_dir(a: TaskArgs) -> Path:
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
                    texts.append(field_of(ans, "text", str, aw))
                    starts.append(field_of(ans, "answer_start", int, aw, low=0))
                _check_answers(context, texts, starts, qw)
                if not texts and not impossible:
                    raise UserError(f"{qw}: no answers and not is_impossible")
                out.append(SquadExample(qid, field_of(qa, "question", str, qw), context, texts, starts))
    if not out:
        raise UserError(f"{path}: no questions")
    return out


def _check_answers(context: str, texts: list[str], starts: list[int], where: str) -> None:
    for m, (text, start) in enumerate(zip(texts, starts)):
        if context[start:start + len(text)] != text:
            raise UserError(f"{where}.answers[{m}]: answer_start {start} does not point at {text[:40]!r} in the context")


# -- the Hugging Face hub

def load_hub(repo: str, config: str | None, spec: str):
    """REPO's splits (the `datasets` DatasetDict) from the hub, or offline from the local
    datasets cache; UserError when neither has it."""
    import datasets  # heavy: only a task without --data_dir needs it
    try:
        return datasets.load_dataset(repo, config)
    except Exception as e:  # offline, unreachable, not cached, a changed repo: many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"--task {spec}: no --data_dir, and {repo}{'/' + config if config else ''} could not be read "
                        f"from the Hugging Face hub or the local datasets cache ({type(e).__name__}: {first}); "
                        "give --data_dir with the task's files") from None


def _hub_split(splits, name: str, where: str):
    if name not in splits:
        raise UserError(f"{where}: no split {name!r} (it has {', '.join(splits)})")
    return splits[name]


def _hub_columns(rows, columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise UserError(f"{where}: no column {missing[0]!r} (it has {', '.join(rows.column_names)})")


def glue_from_hub(name: str, splits) -> Task:
    """GLUE task NAME from nyu-mll/glue's splits (train; validation, MNLI's validation_matched and
    _mismatched), with the labels of the TSV layout: a hub class is ours by name (MNLI, QNLI, RTE)
    or by id (the others' "0"/"1"), so both sources make the same task."""
    g = GLUE[name]
    task = Task(f"glue:{name}", REGRESSION if g.labels is None else CLASSIFICATION, list(g.labels or []), g.metrics)
    where = f"{HUB['glue']}/{name}"
    task.train = _glue_hub_examples(_hub_split(splits, "train", where), g, f"{where}:train")
    task.dev = {d: _glue_hub_examples(_hub_split(splits, "validation" + d[3:], where), g, f"{where}:validation{d[3:]}")
                for d in g.dev}
    return task


def _glue_hub_examples(rows, g: GlueSpec, where: str) -> list[Example]:
    _hub_columns(rows, (*g.hub, "label"), where)
    names = getattr(rows.features["label"], "names", None)
    out = []
    for i, row in enumerate(rows):
        value = row["label"]
        if g.labels is None:
            label = _glue_label(str(value), g, f"{where}:{i}")
        else:
            hub_name = names[value] if names and 0 <= value < len(names) else None
            label = _glue_label(hub_name if hub_name in g.labels else str(value), g, f"{where}:{i}")
        out.append(Example(tuple(check_value(row[c], str, f"{where}:{i}: column {c!r}") for c in g.hub), label,
                           f"{where}:{i}"))
    if not out:
        raise UserError(f"{where}: no examples")
    return out


def squad_from_hub(version: str, splits) -> Task:
    """SQuAD from rajpurkar/squad or squad_v2 (train, validation): an empty answer list is an
    unanswerable question (v2 only)."""
    repo = HUB[version]
    parts = [_squad_hub_examples(_hub_split(splits, split, repo), version == "v2", f"{repo}:{split}")
             for split in ("train", "validation")]
    return Task(f"squad:{version}", SQUAD, [], ("exact_match", "f1"), parts[0], {"dev": parts[1]})


def _squad_hub_examples(rows, v2: bool, where: str) -> list[SquadExample]:
    _hub_columns(rows, ("id", "question", "context", "answers"), where)
    out = []
    for i, row in enumerate(rows):
        w = f"{where}:{i}"
        answers = check_value(row["answers"], dict, f"{w}: answers")
        texts, starts = list(answers.get("text") or []), list(answers.get("answer_start") or [])
        if len(texts) != len(starts):
            raise UserError(f"{w}: {len(texts)} answer texts but {len(starts)} answer starts")
        _check_answers(row["context"], texts, starts, w)
        if not texts and not v2:
            raise UserError(f"{w}: an unanswerable question (no answers) in a SQuAD v1.1 task: use squad:v2")
        out.append(SquadExample(str(row["id"]), row["question"], row["context"], texts, starts))
    if not out:
        raise UserError(f"{where}: no questions")
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
