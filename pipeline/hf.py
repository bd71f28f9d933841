"""Hugging Face format: load BERT checkpoints into our model, export ours so that
transformers.AutoModelForMaskedLM.from_pretrained loads it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from data_prep.files import fsync_dir, fsync_tree

from .model import TIED_DECODER, TIED_DECODER_BIAS, WORD_EMBEDDINGS, BertConfig, BertForMLM, is_gate
from .prune import prune_state_dict


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def hf_config_dict(c: BertConfig) -> dict:
    uniform = len(set(c.heads)) == 1 and len(set(c.ffn)) == 1 and c.heads[0] * c.head_size == c.hidden_size
    d = {
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.heads[0], "intermediate_size": c.ffn[0], "hidden_act": "gelu",
        "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.attention_dropout,
        "max_position_embeddings": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size,
        "initializer_range": c.initializer_range, "layer_norm_eps": c.layer_norm_eps,
        "pad_token_id": 0, "tie_word_embeddings": True,
    }
    if not uniform:  # per-layer sizes: pipeline/modeling_earlybert.py, shipped beside the weights
        d.update(model_type="earlybert", architectures=["EarlyBertForMaskedLM"],
                 num_attention_heads=c.hidden_size // c.head_size, intermediate_size=max(c.ffn),
                 earlybert_heads=list(c.heads), earlybert_ffn=list(c.ffn), earlybert_head_size=c.head_size,
                 auto_map={"AutoConfig": "modeling_earlybert.EarlyBertConfig",
                           "AutoModelForMaskedLM": "modeling_earlybert.EarlyBertForMaskedLM"})
    return d


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").exists():
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").exists():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin")


def load_pretrained(directory: Path | str, **overrides) -> BertForMLM:
    """A `bert-*` checkpoint directory (BertForMaskedLM, BertForPreTraining or BertModel keys).
    A missing MLM head is freshly initialised."""
    directory = Path(directory)
    config = BertConfig.from_json(directory / "config.json", **overrides)
    model = BertForMLM(config)
    theirs = read_state_dict(directory)
    ours = model.state_dict()
    mapped = {}
    for k, v in theirs.items():
        name = k if k.startswith(("bert.", "cls.")) else "bert." + k
        if name in ours:
            mapped[name] = v
    missing = [k for k in ours if k not in mapped and not k.startswith("cls.") and not is_gate(k)]
    if missing:
        raise ValueError(f"{directory}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, v in mapped.items():
        if v.shape != ours[k].shape:
            raise ValueError(f"{directory}: {k} has shape {tuple(v.shape)}, the config says {tuple(ours[k].shape)}")
    if TIED_DECODER not in mapped:
        mapped[TIED_DECODER] = mapped[WORD_EMBEDDINGS]
    model.load_state_dict(mapped, strict=False)
    return model


def folded_state_dict(model: BertForMLM, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The weights (fp32) with every gate folded into the layer that follows it, gates dropped:
    the result computes exactly what the gated model computes."""
    c = model.config
    keep_all = [np.ones(n, dtype=bool) for n in c.heads], [np.ones(n, dtype=bool) for n in c.ffn]
    return prune_state_dict(model.state_dict() if state_dict is None else state_dict, c, *keep_all)


def export(model: BertForMLM, out: Path | str, tokenizer_dir: Path | str | None,
           state_dict: dict | None = None, extra: dict[str, dict] | None = None) -> None:
    """Writes OUT (model.safetensors, config.json, tokenizer, and `extra` JSON files) through a
    temporary directory renamed into place."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = state_dict if state_dict is not None else folded_state_dict(model)
    # safetensors refuses shared storage: the decoder weight is tied to the word embeddings.
    sd = {k: v.contiguous() for k, v in sd.items() if k not in (TIED_DECODER, TIED_DECODER_BIAS)}
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config_dict(model.config)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if config["model_type"] == "earlybert":
        shutil.copy2(Path(__file__).with_name("modeling_earlybert.py"), tmp / "modeling_earlybert.py")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    for name, obj in (extra or {}).items():
        (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    fsync_tree(tmp)
    # The previous OUT is moved aside, not deleted, until the new one is in place: a kill between
    # the two renames leaves both complete copies on disk (OUT.old and OUT.tmp).
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
