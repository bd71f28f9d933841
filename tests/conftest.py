import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def wiki_dump() -> Path:
    import gensim
    return (Path(gensim.__file__).parent / "test" / "test_data" /
            "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


@pytest.fixture(scope="session")
def bert_vocab() -> Path:
    from data_prep.tokenizer import embedded_vocab
    return embedded_vocab()


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, wiki_dump):
    """Real text (the gensim Wikipedia dump) with a trained 1000-token vocabulary, 64 tokens."""
    from data_prep.build import BuildArgs, build
    out = tmp_path_factory.mktemp("train_data") / "data"
    build(BuildArgs(out=out, sources=[f"wikipedia:{wiki_dump}"], vocab_size=1000, seq_len=64,
                    workers=2, val_fraction=0.05))
    return out


def run_cli(*args, cwd=ROOT, env=None, timeout=600) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def tree_bytes(root: Path) -> dict:
    """Every file under root (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
