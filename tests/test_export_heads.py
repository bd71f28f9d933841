"""A pruned export is a model every transformers user can fine-tune: each Auto class loads it in a
fresh process (trust_remote_code: the classes ship beside the weights; one process loads them
all, so transformers is imported once), builds the per-layer
sizes and computes our encoder's hidden states; transformers' Trainer fine-tunes it on real
labeled text, saves it, and the result loads again. The pruned model is the real 6-layer
MiniLM (bert-base-uncased's vocabulary) with a ticket of uneven per-layer sizes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.tokenizer import embedded_vocab
from pipeline.errors import UserError
from pipeline.hf import AUTO_MAP, export, hf_config_dict, load_pretrained, special_token_ids
from pipeline.prune import prune

HEADS_KEPT = [12, 3, 7, 1, 5, 9]  # of 12 per layer: every layer a different width
SEQ = 24


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """(our pruned model, its export directory, the inputs and our hidden states saved beside)."""
    minilm = embedded_vocab().parent
    model = load_pretrained(minilm, gates=True, dropout=0.0, attention_dropout=0.0).eval()
    rng = np.random.default_rng(0)
    heads = [rng.permutation(np.arange(12) < k) for k in HEADS_KEPT]
    ffn = [rng.random(1536) < p for p in (0.6, 0.3, 0.5, 0.2, 0.4, 0.45)]
    small = prune(model, heads, ffn).eval()
    tmp = tmp_path_factory.mktemp("heads")
    export(small, tmp / "pruned", minilm)
    ids = torch.randint(1000, 30000, (3, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, 15:] = 0  # padding, as a fine-tuning batch has it
    ids[1, 15:] = 0
    with torch.no_grad():
        ours = small.encode(ids, attention_mask=mask)
    torch.save({"ids": ids, "mask": mask, "ours": ours}, tmp / "inputs.pt")
    return small, tmp / "pruned", tmp / "inputs.pt"


# Runs in a fresh Python: loads DIR with each transformers Auto class named and reports, per class,
# its class, the per-layer sizes, the weights it had to initialise, and the largest difference
# from our hidden states (one process for all classes: transformers is imported once).
LOAD_ALL = r"""
import json, sys, torch, transformers
out, inputs, autos = sys.argv[1], sys.argv[2], sys.argv[3:]
x = torch.load(inputs)
reports = {}
for auto in autos:
    cls = getattr(transformers, auto)
    if auto == "AutoConfig":
        c = cls.from_pretrained(out, trust_remote_code=True)
        reports[auto] = {"class": type(c).__name__, "heads": c.earlybert_heads, "ffn": c.earlybert_ffn,
                         "pad_token_id": c.pad_token_id}
        continue
    m, info = cls.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    m.eval()
    ids, mask = x["ids"], x["mask"]
    if auto == "AutoModelForMultipleChoice":  # [batch, choices, length]
        ids, mask = ids[None], mask[None]
    with torch.no_grad():
        o = m(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h = o.hidden_states[-1].reshape(x["ours"].shape)
    real = x["mask"].bool()
    enc = m.base_model.encoder.layer
    reports[auto] = {
        "class": type(m).__name__,
        "heads": [l.attention.self.query.out_features for l in enc],
        "ffn": [l.intermediate.dense.out_features for l in enc],
        "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
        "diff": (h - x["ours"])[real].abs().max().item(),
        "outputs": {k: list(v.shape) for k, v in o.items() if torch.is_tensor(v)}}
print("REPORT", json.dumps(reports))
"""

HEAD_WEIGHTS = ("pooler.", "classifier.", "qa_outputs.")  # task heads a fine-tuning initialises


@pytest.fixture(scope="module")
def loaded(pruned) -> dict:
    """Every Auto class's report from one fresh process."""
    _, out, inputs = pruned
    r = subprocess.run([sys.executable, "-c", LOAD_ALL, str(out), str(inputs), *AUTO_MAP], capture_output=True,
                       text=True, env=env(), timeout=600, cwd=out.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("REPORT", 1)[1])


@pytest.mark.parametrize("auto", list(AUTO_MAP))
def test_every_auto_class_loads_a_pruned_export(pruned, loaded, auto):
    small = pruned[0]
    report = loaded[auto]
    hs = small.config.head_size
    assert report["class"] == AUTO_MAP[auto].split(".")[1]
    assert [h // (hs if auto != "AutoConfig" else 1) for h in report["heads"]] == HEADS_KEPT
    assert report["ffn"] == small.config.ffn and len(set(report["ffn"])) == 6
    if auto == "AutoConfig":
        assert report["pad_token_id"] == 0  # [PAD] in bert-base-uncased's vocabulary
        return
    assert report["diff"] < 1e-4, report
    assert all(k.startswith(HEAD_WEIGHTS) or ".".join(k.split(".")[1:]).startswith(HEAD_WEIGHTS)
               for k in report["missing"]), report["missing"]
    assert not [k for k in report["unexpected"] if "encoder" in k], report["unexpected"]
    shapes = report["outputs"]
    expected = {"AutoModel": ("last_hidden_state", [3, SEQ, 384]),
                "AutoModelForMaskedLM": ("logits", [3, SEQ, 30522]),
                "AutoModelForSequenceClassification": ("logits", [3, 2]),
                "AutoModelForTokenClassification": ("logits", [3, SEQ, 2]),
                "AutoModelForQuestionAnswering": ("start_logits", [3, SEQ]),
                "AutoModelForMultipleChoice": ("logits", [1, 3])}[auto]
    assert shapes[expected[0]] == expected[1], shapes


def test_auto_map_names_every_registered_class():
    """hf.py writes AUTO_MAP without importing transformers; modeling_earlybert registers its own
    table: the two must agree."""
    from pipeline import modeling_earlybert as m
    assert {a.__name__: f"modeling_earlybert.{c.__name__}" for a, c in m.AUTO_CLASSES.items()} == AUTO_MAP
    for name in AUTO_MAP.values():
        assert hasattr(m, name.split(".")[1])


def polarity() -> tuple[list[str], list[int]]:
    """gensim's 200 movie-review sentences (Pang and Lee's sentence polarity data), labeled."""
    import gensim
    path = Path(gensim.__file__).parent / "test" / "test_data" / "pang_lee_polarity.cor"
    texts, labels = [], []
    for line in path.read_text(encoding="cp1252").splitlines():  # Windows-1252 (its dashes are 0x97)
        label, text = line.split(" ", 1)
        texts.append(text.strip())
        labels.append(int(label == "__label__pos"))
    return texts, labels


# Runs in a fresh Python: transformers' Trainer fine-tunes the pruned export for a few steps,
# saves it, and a second fresh Python loads what it saved.
FINE_TUNE = r"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
out, work, data = sys.argv[1:4]
d = json.load(open(data))
tok = AutoTokenizer.from_pretrained(out)
enc = tok(d["texts"], truncation=True, max_length=48, padding="max_length")
rows = [{"input_ids": i, "attention_mask": a, "labels": y} for i, a, y in zip(enc["input_ids"], enc["attention_mask"], d["labels"])]
model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True, num_labels=2)
before = model.bert.encoder.layer[1].attention.self.query.weight.detach().clone()
args = TrainingArguments(output_dir=work + "/trainer", max_steps=6, per_device_train_batch_size=8, learning_rate=5e-5,
                         use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0)
t = Trainer(model=model, args=args, train_dataset=rows)
result = t.train()
t.save_model(work + "/finetuned")
tok.save_pretrained(work + "/finetuned")
moved = (model.bert.encoder.layer[1].attention.self.query.weight - before).abs().max().item()
with torch.no_grad():
    x = tok(d["texts"][:4], padding=True, return_tensors="pt")
    logits = model.eval()(**x).logits
torch.save(logits, work + "/logits.pt")
print("REPORT", json.dumps({"steps": result.global_step, "loss": result.training_loss, "moved": moved,
                            "class": type(model).__name__, "q1": model.bert.encoder.layer[1].attention.self.query.out_features}))
"""

RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
work, data = sys.argv[1:3]
d = json.load(open(data))
tok = AutoTokenizer.from_pretrained(work + "/finetuned")
m = AutoModelForSequenceClassification.from_pretrained(work + "/finetuned", trust_remote_code=True).eval()
with torch.no_grad():
    logits = m(**tok(d["texts"][:4], padding=True, return_tensors="pt")).logits
print("REPORT", json.dumps({"diff": (logits - torch.load(work + "/logits.pt")).abs().max().item(),
                            "class": type(m).__name__, "labels": m.config.num_labels}))
"""


def test_transformers_trainer_fine_tunes_a_pruned_export_and_reloads_it(pruned, tmp_path):
    _, out, _ = pruned
    texts, labels = polarity()
    data = tmp_path / "polarity.json"
    data.write_text(json.dumps({"texts": texts, "labels": labels}))
    r = subprocess.run([sys.executable, "-c", FINE_TUNE, str(out), str(tmp_path), str(data)], capture_output=True,
                       text=True, env=env(), timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.split("REPORT", 1)[1])
    assert report["steps"] == 6 and np.isfinite(report["loss"]) and report["moved"] > 0, report
    assert report["class"] == "EarlyBertForSequenceClassification" and report["q1"] == 3 * 32
    saved = json.loads((tmp_path / "finetuned" / "config.json").read_text())
    assert saved["model_type"] == "earlybert" and saved["earlybert_heads"] == HEADS_KEPT
    assert (tmp_path / "finetuned" / "modeling_earlybert.py").exists()  # the saved model stands alone
    r = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path), str(data)], capture_output=True,
                       text=True, env=env(), timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.split("REPORT", 1)[1])
    assert report["diff"] < 1e-5 and report["class"] == "EarlyBertForSequenceClassification", report
    assert report["labels"] == 2


def test_special_token_ids_come_from_the_tokenizer(tmp_path):
    """pad_token_id is the tokenizer's padding token, wherever its vocabulary puts it."""
    from transformers import BertTokenizer
    vocab = ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "[PAD]", "a"]
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(tmp_path / "tok")
    assert special_token_ids(tmp_path / "tok") == {"pad_token_id": 5}
    (tmp_path / "vocab_only").mkdir()
    (tmp_path / "vocab_only" / "vocab.txt").write_text("\n".join(["[CLS]", "[PAD]", "[SEP]"]) + "\n")
    assert special_token_ids(tmp_path / "vocab_only") == {"pad_token_id": 1}
    (tmp_path / "vocab_only" / "vocab.txt").write_text("[CLS]\n[SEP]\n")
    with pytest.raises(UserError, match=r"vocab\.txt: the padding token '\[PAD\]' is not in the vocabulary"):
        special_token_ids(tmp_path / "vocab_only")
    from pipeline.model import BertConfig
    c = BertConfig(vocab_size=7, hidden_size=32, heads=[2], ffn=[64], head_size=16)
    assert hf_config_dict(c, special_token_ids(tmp_path / "tok"))["pad_token_id"] == 5
    assert hf_config_dict(c)["model_type"] == "bert"  # dense exports stay plain BERT
