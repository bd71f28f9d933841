"""Fine-tuning tasks: each reader (GLUE's original layout, SQuAD v1.1/v2.0 with long contexts, CSV
and JSONL), the bad inputs, and the official metrics against values computed by hand. Texts are
real: Pang and Lee's movie-review sentences and the Lee news corpus shipped with gensim."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from data_prep.tokenizer import embedded_vocab
from pipeline import task_metrics as tm
from pipeline.errors import UserError
from pipeline.squad import decode, featurize
from pipeline.tasks import (CLASSIFICATION, GLUE, REGRESSION, SQUAD, TaskArgs, glue_from_hub, load_task, read_squad,
                            squad_from_hub)


def gensim_text(name: str) -> list[str]:
    import gensim
    path = Path(gensim.__file__).parent / "test" / "test_data" / name
    return [line.strip() for line in path.read_text(encoding="cp1252").splitlines() if line.strip()]


SENTENCES = [s.split(" ", 1)[1] for s in gensim_text("pang_lee_polarity.cor")]
POLARITY = [int(s.startswith("__label__pos")) for s in gensim_text("pang_lee_polarity.cor")]
PARAGRAPHS = gensim_text("lee_background.cor")


# -- GLUE, in the layout of the GLUE download (glue_data/<dir>/train.tsv, dev.tsv)

def write_glue(root: Path, name: str, rows_for, n=12) -> Path:
    """TSVs for task NAME with the real columns of its files; rows_for(i) gives (texts, label)."""
    g = GLUE[name]
    d = root / g.directory
    d.mkdir(parents=True, exist_ok=True)
    header = {
        "sst2": ["sentence", "label"], "mrpc": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        "stsb": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
                 "score"],
        "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        "mnli": ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                 "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
        "qnli": ["index", "question", "sentence", "label"], "rte": ["index", "sentence1", "sentence2", "label"],
        "wnli": ["index", "sentence1", "sentence2", "label"]}.get(name)
    for split in ("train", *g.dev):
        lines = [] if header is None else ["\t".join(header)]
        for i in range(n):
            texts, label = rows_for(i)
            if header is None:  # CoLA: source, label, original label, sentence
                lines.append("\t".join(["gj04", str(label), "*" if label == 0 else "", texts[0]]))
                continue
            row = {h: f"x{i}" for h in header}
            for col, t in zip(g.texts, texts):
                row[col] = t
            row[g.label] = str(label)
            lines.append("\t".join(row[h] for h in header))
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def pair(i):
    return SENTENCES[i], SENTENCES[i + 50]


GLUE_ROWS = {
    "cola": lambda i: ((SENTENCES[i],), POLARITY[i * 9 % 200]),
    "sst2": lambda i: ((SENTENCES[i * 17 % 200],), POLARITY[i * 17 % 200]),
    "mrpc": lambda i: (pair(i), i % 2), "qqp": lambda i: (pair(i), (i // 2) % 2),
    "stsb": lambda i: (pair(i), round(5 * i / 11, 3)),
    "mnli": lambda i: (pair(i), ("contradiction", "entailment", "neutral")[i % 3]),
    "qnli": lambda i: (pair(i), ("entailment", "not_entailment")[i % 2]),
    "rte": lambda i: (pair(i), ("entailment", "not_entailment")[i % 2]),
    "wnli": lambda i: (pair(i), i % 2),
}


@pytest.mark.parametrize("name", list(GLUE))
def test_glue_reader(tmp_path, name):
    write_glue(tmp_path, name, GLUE_ROWS[name])
    task = load_task(f"glue:{name}", TaskArgs(data_dir=tmp_path))
    g = GLUE[name]
    assert list(task.dev) == list(g.dev)  # MNLI: matched and mismatched, both
    assert len(task.train) == 12 and all(len(v) == 12 for v in task.dev.values())
    for i, ex in enumerate(task.train):
        texts, label = GLUE_ROWS[name](i)
        assert ex.texts == tuple(texts)
        if name == "stsb":
            assert task.kind == REGRESSION and task.num_labels == 1 and ex.label == pytest.approx(label)
        else:
            assert task.kind == CLASSIFICATION and task.labels[ex.label] == str(label)
    assert task.metrics[0] == {"cola": "matthews", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}.get(name, "accuracy")


def test_glue_bad_inputs(tmp_path):
    with pytest.raises(UserError, match=r"SST-2/train\.tsv: missing"):
        load_task("glue:sst2", TaskArgs(data_dir=tmp_path))
    with pytest.raises(UserError, match="unknown GLUE task"):
        load_task("glue:sst5", TaskArgs(data_dir=tmp_path))
    with pytest.raises(UserError, match="--data_dir"):
        load_task("glue:sst2", TaskArgs())
    write_glue(tmp_path, "rte", lambda i: (pair(i), ("entailment", "contradiction")[i % 2]))
    with pytest.raises(UserError, match=r"RTE/train\.tsv:3: label 'contradiction' is not one of the task's"):
        load_task("glue:rte", TaskArgs(data_dir=tmp_path))
    write_glue(tmp_path, "stsb", lambda i: (pair(i), "high" if i == 4 else 1.0))
    with pytest.raises(UserError, match=r"STS-B/train\.tsv:6: label 'high' is not a number"):
        load_task("glue:stsb", TaskArgs(data_dir=tmp_path))
    write_glue(tmp_path, "wnli", lambda i: (pair(i), 1))
    path = tmp_path / "WNLI" / "dev.tsv"
    path.write_text(path.read_text().replace("\t1\n", "\n", 1))
    with pytest.raises(UserError, match=r"WNLI/dev\.tsv:2: 3 columns, expected at least 4"):
        load_task("glue:wnli", TaskArgs(data_dir=tmp_path))
    # QQP's train.tsv has a few broken rows: skipped and said, as GLUE's own processor skips them
    write_glue(tmp_path, "qqp", GLUE_ROWS["qqp"])
    path = tmp_path / "QQP" / "train.tsv"
    lines = path.read_text().splitlines()
    lines[3] = "\t".join(lines[3].split("\t")[:3])
    path.write_text("\n".join(lines) + "\n")
    task = load_task("glue:qqp", TaskArgs(data_dir=tmp_path))
    assert len(task.train) == 11 and "skipped 1 row" in task.notes[0]


# -- the Hugging Face hub's copies: the same tasks as the files

# nyu-mll/glue's label classes (its dataset card); STS-B's label is a float
HUB_LABELS = {"cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
              "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
              "mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
              "rte": ["entailment", "not_entailment"], "wnli": ["not_entailment", "entailment"]}


def hub_glue(name: str, n=12):
    """nyu-mll/glue's splits for NAME as `datasets` loads them (columns, ClassLabel), same rows as write_glue."""
    import datasets
    g, names = GLUE[name], HUB_LABELS.get(name)
    label = datasets.Value("float32") if names is None else datasets.ClassLabel(names=names)
    features = datasets.Features({**{c: datasets.Value("string") for c in g.hub}, "label": label,
                                  "idx": datasets.Value("int32")})
    cols = {c: [] for c in features}
    for i in range(n):
        texts, y = GLUE_ROWS[name](i)
        for c, t in zip(g.hub, texts):
            cols[c].append(t)
        cols["label"].append(y if names is None else names.index(str(y)) if str(y) in names else int(y))
        cols["idx"].append(i)
    split = datasets.Dataset.from_dict(cols, features=features)
    return datasets.DatasetDict({"train": split, **{"validation" + d[3:]: split for d in g.dev}})


@pytest.mark.parametrize("name", list(GLUE))
def test_glue_from_the_hub_is_the_task_from_the_files(tmp_path, name):
    files = load_task(f"glue:{name}", TaskArgs(data_dir=write_glue(tmp_path, name, GLUE_ROWS[name])))
    hub = glue_from_hub(name, hub_glue(name))
    assert (hub.kind, hub.labels, hub.metrics, list(hub.dev)) == (files.kind, files.labels, files.metrics, list(files.dev))
    for a, b in [(hub.train, files.train)] + [(hub.dev[d], files.dev[d]) for d in files.dev]:
        assert [e.texts for e in a] == [e.texts for e in b]
        assert [e.label for e in a] == pytest.approx([e.label for e in b], rel=1e-6)  # STS-B: float32 there


def test_squad_from_the_hub_and_bad_hub_input(tmp_path):
    import datasets
    path = squad_file(tmp_path / "dev-v2.0.json", True, "v2.0")
    ref = read_squad(path, v2=True)
    rows = [{"id": e.id, "title": "lee", "context": e.context, "question": e.question,
             "answers": {"text": e.answers, "answer_start": e.starts}} for e in ref]
    split = datasets.Dataset.from_list(rows)
    task = squad_from_hub("v2", datasets.DatasetDict({"train": split, "validation": split}))
    assert task.kind == SQUAD and [vars(e) for e in task.dev["dev"]] == [vars(e) for e in ref]
    assert any(not e.answers for e in task.train)  # v2's unanswerable questions
    with pytest.raises(UserError, match=r"rajpurkar/squad:train:3: an unanswerable question"):
        squad_from_hub("v1", datasets.DatasetDict({"train": split, "validation": split}))
    rows[1]["answers"] = {"text": ["not there"], "answer_start": [0]}
    with pytest.raises(UserError, match=r"rajpurkar/squad_v2:train:1.answers\[0\]: answer_start 0 does not point"):
        squad_from_hub("v2", datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "validation": split}))
    with pytest.raises(UserError, match=r"nyu-mll/glue/mnli: no split 'validation_matched'"):
        glue_from_hub("mnli", datasets.DatasetDict({"train": hub_glue("mnli")["train"]}))
    # no --data_dir, offline (as the tests run) and nothing cached: a clear error, not a traceback
    with pytest.raises(UserError, match=r"no --data_dir, and nyu-mll/glue/sst2 could not be read .* give --data_dir"):
        load_task("glue:sst2", TaskArgs())


# -- CSV and JSONL

def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_csv_and_jsonl_tasks(tmp_path):
    rows = [{"text": s, "sentiment": ("neg", "pos")[y]} for s, y in zip(SENTENCES, POLARITY)]
    path = write_jsonl(tmp_path / "reviews.jsonl", rows)
    a = TaskArgs(text_fields=("text",), label_field="sentiment", dev_fraction=0.25, seed=1)
    task = load_task(f"jsonl:{path}", a)
    assert task.kind == CLASSIFICATION and task.labels == ["neg", "pos"] and task.metrics == ("accuracy", "f1")
    assert len(task.dev["dev"]) == 50 and len(task.train) == 150
    train_ids = {e.id for e in task.train}
    assert not train_ids & {e.id for e in task.dev["dev"]}
    assert [e.id for e in load_task(f"jsonl:{path}", a).dev["dev"]] == [e.id for e in task.dev["dev"]]  # seeded
    assert [e.id for e in load_task(f"jsonl:{path}", TaskArgs(**{**a.__dict__, "seed": 2})).dev["dev"]] != \
        [e.id for e in task.dev["dev"]]
    ex = task.train[0]
    assert ex.texts == (SENTENCES[int(ex.id.split(":")[-1]) - 1],)

    import csv
    with open(tmp_path / "pairs.csv", "w", newline="") as f:  # a pair task; numeric labels, quoted commas
        w = csv.writer(f)
        w.writerow(["first", "second", "score"])
        for i in range(40):
            w.writerow([SENTENCES[i], SENTENCES[i + 1], f"{(i % 7) / 2:.1f}"])
    pairs = TaskArgs(text_fields=("first", "second"), label_field="score", dev_fraction=0.2)
    task = load_task(f"csv:{tmp_path / 'pairs.csv'}", pairs)
    assert task.kind == REGRESSION and task.metrics == ("pearson", "spearman")  # numbers, not class ids
    assert any("," in t for e in task.train for t in e.texts)
    assert load_task(f"csv:{tmp_path / 'pairs.csv'}", TaskArgs(**{**pairs.__dict__, "task_type": "classification"})
                     ).labels == ["0", "0.5", "1", "1.5", "2", "2.5", "3"]
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"t": s, "y": y} for s, y in zip(SENTENCES, POLARITY)])
    task = load_task(f"jsonl:{ids}", TaskArgs(text_fields=("t",), label_field="y", dev_fraction=0.1))
    assert task.kind == CLASSIFICATION and task.labels == ["0", "1"]  # 0/1: class ids, not a regression


def test_csv_and_jsonl_bad_inputs(tmp_path):
    rows = [{"text": s, "label": y} for s, y in zip(SENTENCES[90:110], POLARITY[90:110])]  # both labels
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    a = TaskArgs(text_fields=("text",), label_field="label")
    with pytest.raises(UserError, match="--dev PATH or --dev_fraction"):
        load_task(f"jsonl:{train}", a)
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[:3] + [{"text": "x", "label": 7}])
    with pytest.raises(UserError, match=r"dev\.jsonl:4: label 7 is not among the training labels"):
        load_task(f"jsonl:{train}", TaskArgs(**{**a.__dict__, "dev": dev}))
    write_jsonl(dev, rows[:2] + [{"txt": "x", "label": 1}])
    with pytest.raises(UserError, match=r"dev\.jsonl:3: no field 'text'"):
        load_task(f"jsonl:{train}", TaskArgs(**{**a.__dict__, "dev": dev}))
    dev.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=r"dev\.jsonl:2: not JSON"):
        load_task(f"jsonl:{train}", TaskArgs(**{**a.__dict__, "dev": dev}))
    with pytest.raises(UserError, match=r"nothing\.csv: missing"):
        load_task(f"csv:{tmp_path / 'nothing.csv'}", a)
    with pytest.raises(UserError, match="unknown task"):
        load_task("tsv:x", a)


# -- SQuAD, from real paragraphs (the Lee news corpus); contexts longer than a window

def squad_file(path: Path, v2: bool, version: str) -> Path:
    """Questions whose answers are spans of real paragraphs: 'Which words follow "<w1 w2 w3>"?'
    answered by the next words; with v2, every fourth question asks about words the paragraph
    does not contain."""
    data, n = [], 0
    for p, context in enumerate(PARAGRAPHS[:6]):
        words = context.split(" ")
        qas = []
        for q in range(4):
            at = (len(words) - 8) * (q + 1) // 5  # spread over the paragraph: early and late windows
            answer = " ".join(words[at + 3:at + 6])
            start = len(" ".join(words[:at + 3])) + 1
            qa = {"id": f"p{p}q{q}", "question": f'Which words follow "{" ".join(words[at:at + 3])}"?',
                  "answers": [{"text": answer, "answer_start": start}]}
            if v2 and q == 3:
                qa = {"id": f"p{p}q{q}", "question": f'Which words follow "{PARAGRAPHS[p + 7][:30]}"?',
                      "answers": [], "is_impossible": True}
            qas.append(qa)
            n += 1
        data.append({"title": f"lee{p}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": version, "data": data}))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(embedded_vocab().parent))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_squad_reader_windows_and_decoding(tmp_path, tokenizer, version):
    v2 = version == "v2"
    names = ("train-v2.0.json", "dev-v2.0.json") if v2 else ("train-v1.1.json", "dev-v1.1.json")
    for name in names:
        squad_file(tmp_path / name, v2, "v2.0" if v2 else "1.1")
    task = load_task(f"squad:{version}", TaskArgs(data_dir=tmp_path))
    assert task.kind == SQUAD and task.metrics == ("exact_match", "f1") and len(task.dev["dev"]) == 24
    examples = task.dev["dev"]
    f = featurize(examples, tokenizer, max_len=128, stride=32)
    per_example = np.bincount(f.example)
    assert per_example.max() > 2  # long contexts: several windows each
    # every labelled span is the answer's text (a window without it points at [CLS])
    for i in range(len(f.example)):
        ex = examples[f.example[i]]
        if f.start[i]:
            text = ex.context[f.offsets[i][f.start[i]][0]:f.offsets[i][f.end[i]][1]]
            assert text == ex.answers[0]
    assert all((f.start[f.example == k] > 0).any() == bool(ex.answers) for k, ex in enumerate(examples))
    # logits that point at the labelled spans decode to the answers: EM = F1 = 100
    start = np.full(f.input_ids.shape, -10.0)
    end = np.full(f.input_ids.shape, -10.0)
    for i in range(len(f.example)):
        start[i, f.start[i]] = end[i, f.end[i]] = 10.0 if f.start[i] else 0.0
        if not f.start[i] and not examples[f.example[i]].answers:
            start[i, 0] = end[i, 0] = 10.0
    pred = decode(examples, f, start, end, v2)
    gold = {ex.id: ex.answers for ex in examples}
    scores = tm.squad_scores(pred, gold)
    assert scores["exact_match"] == 100.0 and scores["f1"] == 100.0
    if v2:
        assert scores["NoAns_exact_match"] == 100.0 and sum(not a for a in gold.values()) == 6
        assert pred["p0q3"] == ""
    else:
        assert "NoAns_f1" not in scores


def test_squad_bad_inputs(tmp_path):
    path = squad_file(tmp_path / "dev-v1.1.json", False, "1.1")
    d = json.loads(path.read_text())
    d["data"][1]["paragraphs"][0]["qas"][2]["answers"][0]["answer_start"] += 1
    (tmp_path / "train-v1.1.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=r"train-v1\.1\.json: data\[1\]\.paragraphs\[0\]\.qas\[2\]\.answers\[0\]: "
                                        r"answer_start \d+ does not point at"):
        load_task("squad:v1", TaskArgs(data_dir=tmp_path))
    squad_file(tmp_path / "train-v1.1.json", True, "v2.0")
    with pytest.raises(UserError, match="unanswerable question .* use squad:v2"):
        load_task("squad:v1", TaskArgs(data_dir=tmp_path))
    (tmp_path / "train-v1.1.json").write_text('{"data": [{"paragraphs": [{"context": "a", "qas": [{}]}]}]}')
    with pytest.raises(UserError, match=r"train-v1\.1\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]"):
        load_task("squad:v1", TaskArgs(data_dir=tmp_path))


# -- metrics, against values computed by hand

def test_classification_metrics_by_hand():
    gold = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    pred = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]  # tp 3, fn 1, fp 1, tn 5
    assert tm.accuracy(pred, gold) == 0.8
    assert tm.f1_binary(pred, gold) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert tm.matthews(pred, gold) == pytest.approx((3 * 5 - 1 * 1) / math.sqrt(4 * 4 * 6 * 6))
    assert tm.matthews([0] * 10, gold) == 0.0 and tm.f1_binary([0] * 10, gold) == 0.0
    # three classes: Gorodkin's R_K from the confusion matrix [[2,1,0],[0,2,1],[1,0,3]]
    gold3 = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    pred3 = [0, 0, 1, 1, 1, 2, 0, 2, 2, 2]
    c, t, p, n = 7, np.array([3, 3, 4]), np.array([3, 3, 4]), 10
    assert tm.matthews(pred3, gold3) == pytest.approx((c * n - t @ p) / math.sqrt((n * n - p @ p) * (n * n - t @ t)))


def test_correlations_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0]
    # Pearson: deviations (-1.5,-.5,.5,1.5) and (-3,-1,0,4): sum 4.5+.5+0+6 = 11; norms sqrt(5), sqrt(26)
    assert tm.pearson(x, y) == pytest.approx(11 / math.sqrt(5 * 26))
    assert tm.spearman(x, y) == pytest.approx(1.0)
    # ties take their average rank: y ranks (1, 2.5, 2.5, 4)
    assert tm.spearman(x, [1.0, 3.0, 3.0, 7.0]) == pytest.approx(tm.pearson([1, 2, 3, 4], [1, 2.5, 2.5, 4]))
    assert tm.spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert tm.spearman([3, 1, 2], [10, 30, 20]) == pytest.approx(-1.0)


def test_squad_metrics_by_hand():
    assert tm.normalize_answer("The  Cat's, hat!") == "cats hat"
    assert tm.exact_match("the cat", "Cat.") == 1.0
    # prediction "a big red dog" -> "big red dog"; gold "red dog barked": common 2, P 2/3, R 2/3
    assert tm.token_f1("a big red dog", "red dog barked") == pytest.approx(2 / 3)
    s = tm.squad_scores({"q1": "red dog", "q2": "nothing", "q3": ""},
                        {"q1": ["a red dog", "dog"], "q2": ["something else"], "q3": [""], "q4": ["x"]})
    # q1 EM 1 F1 1; q2 0, 0; q3 (unanswerable, empty) 1, 1; q4 no prediction 0, 0
    assert s["exact_match"] == 50.0 and s["f1"] == 50.0
    assert s["HasAns_exact_match"] == pytest.approx(100 / 3) and s["NoAns_f1"] == 100.0
