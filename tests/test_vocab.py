"""data_prep.vocab: word counts as the trainer counts them, and a WordPiece vocabulary that the same
counts give in any process (tokenizers' own trainer gives one of several there: issue #1794)."""
import bz2
import json
import os
import subprocess
import sys
import unicodedata
from collections import Counter

import pytest
from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.pre_tokenizers import WhitespaceSplit

from conftest import ROOT
from data_prep.tokenizer import BERT_SPECIAL_TOKENS, load_saved
from data_prep.vocab import (_CONTROLS, _FEED_CHARS, LIMIT_ALPHABET, _check_words, _feed,
                             add_counts, count_words, train_wordpiece)

SPECIALS = list(BERT_SPECIAL_TOKENS.values())
# Isolated by the normalizer, each its own word, all seen 3 times: with the dump's characters more
# than LIMIT_ALPHABET, tied at the cut.
CJK_LINES = [" ".join(chr(0x4E00 + i) for i in range(1100))] * 3


@pytest.fixture(scope="module")
def wiki_lines(wiki_dump) -> list[str]:
    """300,000 characters of the dump's XML (English articles and their interwiki links): enough
    ties that the old trainer (train_from_iterator on the texts, vocabulary 3000) ended with a
    different vocabulary in each of 5 processes (`##09`, `##35`, `first3`, `markets`, `179`...)."""
    with bz2.open(wiki_dump, "rt", encoding="utf-8") as f:
        return f.read(300_000).splitlines()


def reference_counts(texts, cased: bool) -> dict[str, int]:
    """What the trainer counts: BertWordPieceTokenizer's normalizer, then its pre-tokenizer."""
    tok = BertWordPieceTokenizer(lowercase=not cased, strip_accents=None if not cased else False)
    norm, pre = tok.normalizer.normalize_str, tok.pre_tokenizer.pre_tokenize_str
    return dict(Counter(w for t in texts for w, _ in pre(norm(t))))


def old_train(texts, vocab_size: int, cased: bool, special_tokens=SPECIALS) -> dict[str, int]:
    """The removed data_prep.tokenizer.train_tokenizer: the trainer fed the texts."""
    wp = BertWordPieceTokenizer(lowercase=not cased, strip_accents=None if not cased else False)
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False,
                           special_tokens=special_tokens, limit_alphabet=LIMIT_ALPHABET,
                           wordpieces_prefix="##")
    learned = sorted(t for t in wp.get_vocab() if t not in SPECIALS)
    return {t: i for i, t in enumerate(SPECIALS + learned)}


def vocab_of(tok) -> dict[str, int]:
    return tok.tokenizer.get_vocab(with_added_tokens=True)


# --------------------------------------------------------------- same counts, same vocabulary

TRAIN_CHILD = """
import json, random, sys
from pathlib import Path
from data_prep.vocab import train_wordpiece
counts = list(json.loads(Path(sys.argv[1]).read_text()).items())
random.Random(int(sys.argv[2])).shuffle(counts)  # and a different insertion order in each
train_wordpiece(dict(counts), 3000, cased=False).save(Path(sys.argv[3]))
"""


def test_same_counts_same_vocabulary_in_three_processes(tmp_path, wiki_lines):
    counts = count_words(wiki_lines + CJK_LINES, cased=False)
    assert len(set("".join(counts))) > LIMIT_ALPHABET  # the alphabet is cut, at a tie
    (tmp_path / "counts.json").write_text(json.dumps(counts))
    procs = []
    for seed, parallel in ((1, "false"), (2, "true"), (3, "true")):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED=str(seed),
                   TOKENIZERS_PARALLELISM=parallel)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", TRAIN_CHILD, tmp_path / "counts.json", str(seed),
             tmp_path / f"tok{seed}"], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True))
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    files = [{name: (tmp_path / f"tok{seed}" / name).read_bytes()
              for name in ("tokenizer.json", "tokenizer_config.json")} for seed in (1, 2, 3)]
    assert files[0] == files[1] == files[2]
    assert len(json.loads(files[0]["tokenizer.json"])["model"]["vocab"]) == 3000


# ------------------------------------------------------------ counts merged in any order or split

def test_counts_merged_in_any_order_or_split(wiki_lines):
    texts = wiki_lines + CJK_LINES
    whole = count_words(texts, cased=False)
    cuts = [0, 1, 500, 501, 2000, 3100, 3101, len(texts)]
    units = [count_words(texts[a:b], cased=False) for a, b in zip(cuts, cuts[1:])]
    forward: dict[str, int] = {}
    for u in units:
        add_counts(forward, u)
    backward: dict[str, int] = {}
    for u in reversed(units):
        add_counts(backward, dict(reversed(list(u.items()))))
    pairs = [dict(units[i]) for i in range(0, len(units), 2)]
    for i, u in enumerate(units[1::2]):
        add_counts(pairs[i], u)
    tree: dict[str, int] = {}
    for p in reversed(pairs):
        add_counts(tree, p)
    # A text cut at its spaces counts the same as whole.
    split_texts = [piece for t in texts for piece in t.split(" ")]
    assert forward == backward == tree == whole == count_words(split_texts, cased=False)
    assert units[1] is not forward and units[1] == count_words(texts[1:500], cased=False)

    want = train_wordpiece(whole, 2000, cased=False).tokenizer.to_str()
    assert train_wordpiece(forward, 2000, cased=False).tokenizer.to_str() == want
    assert train_wordpiece(dict(sorted(backward.items(), reverse=True)), 2000,
                           cased=False).tokenizer.to_str() == want


def test_add_counts_sums_in_place():
    into = {"a": 1, "b": 2}
    add_counts(into, {"b": 3, "c": 4})
    add_counts(into, {})
    assert into == {"a": 1, "b": 5, "c": 4}


# ----------------------------------------------------------- counts as the trainer counts them

@pytest.mark.parametrize("cased", [False, True])
def test_counts_match_the_trainers_on_real_text(wiki_lines, cased):
    hand = ["Ünïcödé CAFÉ café naïve ﬁ İstanbul ΣΊΣΥΦΟΣ straße ẞ Å Ω x\u0301 \u0301y",
            "中文字符 日本語のテキスト 한국어 텍스트 ภาษาไทย العربية עברית हिन्दी 🤗🤗",
            "tabs\tand\nnew\rlines\x0bvt\x0cff\x1cfs\x85nel\xa0nbsp\u2028ls\u3000ideo",
            "a\x00b\ufffdc e\u200bf",
            "don't \"quote\" (paren) [br] {c} a-b_c a.b, x@y.z #tag ##hash $5 100%",
            "¿qué? «guillemets» — –", "", "   ", "\x1c\x1d"]
    texts = wiki_lines + hand
    assert count_words(texts, cased) == reference_counts(texts, cased)
    assert count_words([], cased) == {}


@pytest.mark.parametrize("cased", [False, True])
def test_counts_match_the_trainers_over_all_of_unicode(cased):
    """Every assigned character, alone, inside a word and doubled: count_words gives the Rust
    normalizer's and pre-tokenizer's words, and those words are fixed points (normalized and
    pre-tokenized again, each comes back whole and once: what the trainer would see fed them)."""
    chars = [chr(c) for c in range(0x110000)
             if unicodedata.category(chr(c)) not in ("Cs", "Cn", "Co")]
    texts = [" ".join(f"x{c}y {c} Q{c}{c}" for c in chars[i:i + 2000])
             for i in range(0, len(chars), 2000)]
    counts = count_words(texts, cased)
    assert counts == reference_counts(texts, cased)
    tok = BertWordPieceTokenizer(lowercase=not cased, strip_accents=None if not cased else False)
    norm, pre = tok.normalizer.normalize_str, tok.pre_tokenizer.pre_tokenize_str
    words = sorted(counts)
    for i in range(0, len(words), 4096):
        batch = words[i:i + 4096]
        assert [w for w, _ in pre(norm(" ".join(batch)))] == batch
    _check_words(words)


def test_count_words_splits_only_where_bert_does():
    """count_words cuts texts with str.split after deleting C0/C1 controls: each character it
    cuts at, the BERT normalizer makes a space, each it deletes the normalizer deletes. And the
    trainer's WhitespaceSplit cuts only where str.split does."""
    norm = BertWordPieceTokenizer().normalizer.normalize_str
    for cp in range(0x110000):
        c = chr(cp)
        if _CONTROLS.match(c):
            assert norm(f"a{c}b") == "ab", hex(cp)
        elif c.isspace():
            assert norm(f"a{c}b") == "a b", hex(cp)
    everything = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    for i in range(0, len(everything), 1 << 16):
        text = "".join(everything[i:i + (1 << 16)])
        kept = [False] * len(text)
        for _, (a, b) in WhitespaceSplit().pre_tokenize_str(text):
            kept[a:b] = [True] * (b - a)
        assert all(c.isspace() for c, k in zip(text, kept) if not k)
    with pytest.raises(ValueError, match="whitespace"):
        _check_words(["a", "b c"])


def test_trainer_fed_the_texts_agrees(wiki_lines):
    """The trainer fed the texts themselves, with train_wordpiece's fixed ids, learns the same
    vocabulary as train_wordpiece fed the counts: it counted the same words. The old trainer (no
    fixed ids) learns one a few tied tokens apart."""
    counts = count_words(wiki_lines, cased=False)
    chars = set("".join(counts))
    assert len(chars) < LIMIT_ALPHABET  # no word is dropped
    fixed = (sorted(chars) + ["##" + c for c in sorted(set("".join(w[1:] for w in counts)))])
    want = vocab_of(train_wordpiece(counts, 3000, cased=False))
    assert old_train(wiki_lines, 3000, False, SPECIALS + fixed) == want
    old = old_train(wiki_lines, 3000, False)
    assert len(old) == len(want) == 3000
    assert len(old.keys() ^ want.keys()) <= 30


# ------------------------------------------------------------------------ the vocabulary itself

def test_vocabulary_encodes_with_ordinary_wordpieces(tmp_path, wiki_lines):
    tok = train_wordpiece(count_words(wiki_lines, cased=False), 2000, cased=False)
    assert len(tok) == 2000
    assert tok.special_ids() == {r: i for i, r in enumerate(BERT_SPECIAL_TOKENS)}
    # Only BERT's five are special (added) tokens; the `##c` and single characters the trainer was
    # given as special tokens are plain WordPiece entries.
    assert sorted(tok.tokenizer.get_added_tokens_decoder()) == [0, 1, 2, 3, 4]
    model_vocab = tok.tokenizer.get_vocab(with_added_tokens=False)
    assert len(model_vocab) == 2000 and "##s" in model_vocab and "a" in model_vocab
    vocab = sorted(model_vocab, key=model_vocab.get)
    assert vocab == SPECIALS + sorted(vocab[5:])
    text = "Anarchism is a political philosophy that advocates self-governed societies."
    enc = tok.tokenizer.encode(text)
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]" and "[UNK]" not in enc.tokens
    assert any(t.startswith("##") for t in enc.tokens)
    assert tok.tokenizer.decode(enc.ids).split() == text.lower().replace("-", " - ").split()
    tok.save(tmp_path / "tok")
    assert load_saved(tmp_path / "tok").tokenizer.encode(text).ids == enc.ids
    # Cased: the same counts' words keep their case.
    cased = train_wordpiece(count_words(wiki_lines, cased=True), 2000, cased=True)
    assert len(cased) == 2000 and "The" in vocab_of(cased)


def test_alphabet_cut_by_count_then_character():
    """More characters than LIMIT_ALPHABET: the most frequent are kept, ties by character, and
    the words holding another character are dropped."""
    yi = [chr(0xA000 + i) for i in range(1100)]  # Yi syllables: letters, kept inside words
    counts = {"the": 50, "then": 20, "thee": 10, **{"t" + c: 3 for c in yi}}
    kept = LIMIT_ALPHABET - 4  # after t, h, e, n
    vocab = vocab_of(train_wordpiece(dict(reversed(list(counts.items()))), 5000, cased=True))
    assert all(c in vocab and "##" + c in vocab for c in yi[:kept])
    assert not any(c in vocab or "##" + c in vocab or "t" + c in vocab for c in yi[kept:])
    assert "then" in vocab and "t" + yi[0] in vocab


def test_vocabulary_size_limits():
    counts = {"hello": 3, "world": 2, "held": 1}
    alphabet = sorted(set("helloworldheld"))
    floor = 5 + len(alphabet) + len({"##" + c for w in counts for c in w[1:]})
    # Asked for too little: the whole alphabet (and its ## forms) is kept all the same.
    assert len(train_wordpiece(counts, 3, cased=False)) == floor
    # A corpus too small for the size asked: training stops when no pair is seen twice.
    small = vocab_of(train_wordpiece(counts, 1000, cased=False))
    assert floor < len(small) < 1000 and "hello" in small and "world" in small
    assert "held" not in small
    assert train_wordpiece({}, 1000, cased=False).tokenizer.get_vocab_size() == 5


def test_feed_repeats_each_word_its_count_in_bounded_strings():
    long = "x" * (_FEED_CHARS + 10)
    counts = {"a": 1, "the": 100_003, long: 3, "zz": 2}
    fed = list(_feed(sorted(counts), counts))
    assert all(len(s) <= _FEED_CHARS or s == long + " " for s in fed)
    assert Counter(w for s in fed for w in s.split()) == counts


def test_raw_text_is_refused():
    with pytest.raises(ValueError, match="whitespace"):
        train_wordpiece({"hello world": 3}, 100, cased=False)
