"""The validation split (data_prep/split.py): a fraction of the tokens met by whole documents,
chosen from the documents' hashes and token counts alone; lumpy corpora warned about, a split
that would be empty refused."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from data_prep.build import BuildArgs, build
from data_prep.split import TOLERANCE, choose_validation


@pytest.fixture(scope="module")
def lines():
    import gensim
    path = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    return [x for x in path.read_text().splitlines() if x.strip()]


def test_choice_depends_on_the_documents_only():
    rng = np.random.default_rng(0)
    docs = rng.integers(0, 2**63, 2000, dtype=np.uint64)
    tokens = rng.integers(1, 5000, 2000)
    chosen, fig = choose_validation(docs, tokens, 0.05)
    assert abs(fig["tokens"] - 0.05 * tokens.sum()) <= TOLERANCE * 0.05 * tokens.sum()
    assert fig["documents"] == len(chosen) and fig["total_documents"] == 2000
    order = rng.permutation(2000)
    assert np.array_equal(choose_validation(docs[order], tokens[order], 0.05)[0], chosen)
    # A document in several pieces (or units) is one document: its tokens add up.
    halves = tokens // 2
    split_docs = np.concatenate([docs, docs])
    again, _ = choose_validation(split_docs, np.concatenate([halves, tokens - halves]), 0.05)
    assert np.array_equal(again, chosen)
    assert len(choose_validation(docs, tokens, 0.0)[0]) == 0


def test_few_long_documents_meet_the_token_fraction(tmp_path, lines):
    """A BookCorpus-shaped corpus: 40 books of 10-60 lines and 6 short articles. The split holds
    about 10 % of the tokens in whole documents, not 10 % of the documents."""
    books = tmp_path / "books"
    books.mkdir()
    rng = np.random.default_rng(1)
    start = 0
    for i in range(46):
        n = int(rng.integers(10, 60)) if i < 40 else 2
        (books / f"doc{i:02d}.txt").write_text("\n".join(lines[start % len(lines):][:n]))
        start += n
    out = tmp_path / "out"
    m = build(BuildArgs(out=out, sources=[f"text:{books}"], val_fraction=0.1, workers=1, seq_len=64))
    v = m["validation_split"]
    assert abs(v["fraction"] - 0.1) <= 0.1 * TOLERANCE and v["fraction_asked"] == 0.1, v
    assert v["documents"] >= 1 and v["total_documents"] == 46
    assert m["splits"]["validation"]["num_tokens"] > 0
    kept = m["sources"][0]["documents_by_split"]
    assert kept["validation"] == v["documents"] and kept["train"] == 46 - v["documents"]
    r = run_cli("-m", "data_prep", "inspect", out, "--samples", "0")
    assert r.returncode == 0 and f"validation split: {v['documents']} of 46 documents" in r.stdout, r.stdout


def test_lumpy_corpus_warns_and_a_split_that_would_be_empty_is_refused(tmp_path, lines):
    books = tmp_path / "books"
    books.mkdir()
    for i, n in enumerate((50, 50, 10)):  # two long books and a short one: 12 % of the tokens
        (books / f"book{i}.txt").write_text("\n".join(lines[i * 50:i * 50 + n]))
    base = ["-m", "data_prep", "build", "--source", f"text:{books}", "--workers", "1"]
    r = run_cli(*base, "--out", tmp_path / "o1", "--val-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    assert "warning: validation split: 1 of 3 documents" in r.stderr and "asked 20.0000%" in r.stderr, r.stderr
    r = run_cli(*base, "--out", tmp_path / "o2", "--val-fraction", "0.05")  # no book fits in 5 %
    assert r.returncode == 2 and "--val-fraction 0.05: no document of text:" in r.stderr \
        and "pass a larger --val-fraction, or --val-fraction 0" in r.stderr, r.stderr
    assert not (tmp_path / "o2" / "manifest.json").exists()
    one = tmp_path / "one"
    one.mkdir()
    (one / "book.txt").write_text("\n".join(lines[:50]))
    r = run_cli("-m", "data_prep", "build", "--source", f"text:{one}", "--out", tmp_path / "o3", "--workers", "1")
    assert r.returncode == 2 and "--val-fraction 0.005" in r.stderr and "smallest of its 1 document" in r.stderr, r.stderr
    r = run_cli("-m", "data_prep", "build", "--source", f"text:{one}", "--out", tmp_path / "o4", "--workers", "1",
                "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "o4" / "manifest.json").read_text())
    assert m["splits"]["validation"]["num_sequences"] == 0 and m["validation_split"]["documents"] == 0
