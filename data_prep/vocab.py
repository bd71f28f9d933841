"""A WordPiece vocabulary trained from word counts: the same counts give the same vocabulary in any
process. The workers count words (count_words) unit by unit, the main process sums the counts
(add_counts) and trains once (train_wordpiece) with the `tokenizers` Rust trainer.

Why not `BertWordPieceTokenizer.train_from_iterator` on the texts: the BPE trainer behind the
WordPiece trainer lets the order of a hash map of the words (AHashMap, seeded at random in each
process) decide the vocabulary where counts tie (huggingface/tokenizers issue #1794). Lines of
tokenizers/src/models/bpe/trainer.rs, unchanged from tokenizers 0.23.1 to 0.23.3:
  - `tokenize_words` (374-401) gives each `##c` continuation token the next free id when it first
    meets it, iterating over the words' hash map, so their ids change from process to process;
  - the merge queue pops the most frequent pair and, of equally frequent pairs, the one with the
    smaller ids (`Merge::cmp`, 30-38), so those ids decide tied merges, and each merged token
    takes the next free id (540-548), which carries the order on to later ties;
  - `compute_alphabet` (329-343) keeps the `limit_alphabet` most frequent characters with
    `sort_unstable_by_key` on the count alone over the hash map's entries, so of characters tied
    at the cut an arbitrary one is kept.
The rest is order-free: the alphabet's ids follow the characters' order (346), pair counts are
sums, and the queue's order is total on (count, pair). One corner remains, not seen in our tests:
two queue entries for the same pair with the same count pop in heap order; that takes a merge that
makes a token already in the vocabulary ("ab"+"##c" after "a"+"##bc").

So here the alphabet is ours (the LIMIT_ALPHABET most frequent characters, ties broken by
character; a word holding another character is dropped, as WordPiece would make it [UNK] anyway;
the trainer would skip that character and pair its neighbours), and the alphabet and the `##c`
tokens, sorted, follow BERT's tokens as the trainer's special tokens: the trainer puts those in
its vocabulary first (`add_special_tokens`, 295-307), in our order, and finds them there when it
tokenizes the words. Every id is fixed before the first merge.

The trainer counts pairs in i32 (432, 584): a pair seen more than 2**31 - 1 times (a corpus of
tens of billions of words) would wrap, as it did before.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from functools import lru_cache
from operator import add
from typing import Callable, Iterable, Iterator

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.models import WordPiece
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.trainers import WordPieceTrainer

from .tokenizer import BERT_SPECIAL_TOKENS, TokenizerFiles, wordpiece

LIMIT_ALPHABET = 1000
MIN_FREQUENCY = 2  # a merge needs a pair seen at least twice
PREFIX = "##"
_FEED_CHARS = 1 << 16  # the longest string fed to the trainer at a time

# C0 and C1 control characters except \t \n \r: the BERT normalizer deletes them (it deletes every
# Cc, Cf, Cn, Co character and maps whitespace to " "). Deleted before str.split, which would
# split at \x0b \x0c \x1c-\x1f \x85 where the normalizer joins the neighbours.
_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# What the BERT pre-tokenizer makes of printable ASCII without whitespace: runs of letters and
# digits, and each punctuation character alone.
_ASCII_WORDS = re.compile("[0-9A-Za-z]+|[^0-9A-Za-z]").findall


@lru_cache(maxsize=2)
def _bert(cased: bool) -> tuple[Callable[[str], str], Callable[[str], list]]:
    """The BERT normalizer and pre-tokenizer, as the trainer and the tokenizer use them."""
    tok = BertWordPieceTokenizer(lowercase=not cased, strip_accents=None if not cased else False)
    return tok.normalizer.normalize_str, tok.pre_tokenizer.pre_tokenize_str


def count_words(texts: Iterable[str], cased: bool) -> dict[str, int]:
    """word -> occurrences, words as the trainer sees them: BERT normalization (lowercase and strip
    accents unless cased) then BERT pre-tokenization. Runs in worker processes on one unit of the
    corpus at a time."""
    normalize, pre_tokenize = _bert(cased)
    # Normalizing and pre-tokenizing every word costs about 1 us a word in the bindings; a text
    # split at whitespace gives the same words as the whole text would (the normalizer works
    # character by character and maps whitespace to " ", and no character combines across it), so
    # each distinct piece is resolved once. Printable ASCII pieces, most of them, need no Rust:
    # the normalizer only lowercases them (when uncased) and the pre-tokenizer isolates ASCII
    # punctuation. tests/test_vocab.py checks all this against the Rust functions, character by
    # character over all of Unicode.
    pieces: Counter[str] = Counter()
    for text in texts:
        if _CONTROLS.search(text):
            text = _CONTROLS.sub("", text)
        pieces.update(text.split())
    counts: dict[str, int] = {}
    get = counts.get
    for piece, n in pieces.items():
        if piece.isascii():
            if not cased:
                piece = piece.lower()
            if piece.isalnum():
                counts[piece] = get(piece, 0) + n
                continue
            words = _ASCII_WORDS(piece)
        else:
            words = [w for w, _ in pre_tokenize(normalize(piece))]
        for w in words:
            counts[w] = get(w, 0) + n
    return counts


def add_counts(into: dict[str, int], more: dict[str, int]) -> None:
    """merge (sum) in place; the main process merges the units' counts in unit order."""
    # Loops in C (set, map, dict.update): a unit's counts hold hundreds of thousands of words.
    common = list(more.keys() & into.keys())
    sums = list(map(add, map(into.__getitem__, common), map(more.__getitem__, common)))
    into.update(more)
    into.update(zip(common, sums))


def _alphabet(words: list[str], counts: dict[str, int]) -> list[str]:
    """The LIMIT_ALPHABET characters seen most often (the trainer's count: a word's characters
    times its count), ties broken by character; sorted."""
    by_count: defaultdict[int, list[str]] = defaultdict(list)
    for w in words:
        by_count[counts[w]].append(w)
    seen: Counter[str] = Counter()
    for n, same in by_count.items():  # one C-level character count per distinct count
        for c, k in Counter("".join(same)).items():
            seen[c] += k * n
    return sorted(sorted(seen, key=lambda c: (-seen[c], c))[:LIMIT_ALPHABET])


def _feed(words: list[str], counts: dict[str, int]) -> Iterator[str]:
    """The words, each repeated its count times, in strings of at most _FEED_CHARS (a longer word
    alone)."""
    buf: list[str] = []
    used = 0
    for w in words:
        piece = w + " "
        left = counts[w]
        while left:
            room = (_FEED_CHARS - used) // len(piece)
            if room <= 0 and buf:  # (below 0 after a word longer than _FEED_CHARS)
                yield "".join(buf)
                buf, used = [], 0
                continue
            k = min(left, max(1, room))
            buf.append(piece * k)
            used += k * len(piece)
            left -= k
    if buf:
        yield "".join(buf)


def _check_words(words: list[str]) -> None:
    """The trainer splits what it is fed at whitespace (Rust's char::is_whitespace, which
    str.split also splits at): each word must come back whole, once."""
    step = 1 << 14
    for i in range(0, len(words), step):
        batch = words[i:i + step]
        if " ".join(batch).split() != batch:
            bad = next(w for w in batch if w.split() != [w])
            raise ValueError(f"not a word count_words makes (it holds whitespace): {bad!r}")


def train_wordpiece(counts: dict[str, int], vocab_size: int, cased: bool) -> TokenizerFiles:
    """A WordPiece vocabulary trained from merged word counts: the same counts give the same
    vocabulary in any process (with the same `tokenizers`), whatever the dict's insertion order.

    vocab_size counts everything, the five BERT special tokens included. The trainer always keeps
    the whole alphabet (its characters and their `##` forms), so a vocab_size below that gives
    that instead; and it stops when no pair of tokens is seen MIN_FREQUENCY times any more, so a
    corpus too small for vocab_size gives a smaller vocabulary (len() of the result says)."""
    words = sorted(w for w, n in counts.items() if n > 0 and w)
    alphabet = _alphabet(words, counts)
    if len(alphabet) == LIMIT_ALPHABET:  # there may have been more characters: drop their words
        foreign = re.compile("[^" + "".join(map(re.escape, alphabet)) + "]").search
        words = [w for w in words if not foreign(w)]
    _check_words(words)
    specials = list(BERT_SPECIAL_TOKENS.values())
    continuations = [PREFIX + c for c in sorted(set("".join(w[1:] for w in words)))]
    # The words are normalized and pre-tokenized already: the trainer only has to split the fed
    # strings at the spaces between them (three times faster than BERT's normalizer again).
    tok = Tokenizer(WordPiece(unk_token=BERT_SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = WhitespaceSplit()
    # The ids: BERT's tokens, the alphabet by character (as the trainer's compute_alphabet would
    # number it, and kept even where only dropped words held a character), then the `##c` tokens
    # by character (where the trainer would put them, in its hash order). The alphabet has no
    # more than limit_alphabet characters, so the trainer's own cut removes none.
    trainer = WordPieceTrainer(vocab_size=vocab_size, min_frequency=MIN_FREQUENCY,
                               limit_alphabet=LIMIT_ALPHABET, continuing_subword_prefix=PREFIX,
                               special_tokens=specials + alphabet + continuations,
                               show_progress=False)
    tok.train_from_iterator(_feed(words, counts), trainer=trainer)
    # The trainer made the alphabet and `##c` tokens special (added) tokens; rebuilt from the plain
    # vocabulary they are ordinary WordPiece entries, and ids are sorted as before.
    learned = sorted(t for t in tok.get_vocab() if t not in specials)
    return wordpiece({t: i for i, t in enumerate(specials + learned)}, cased)
