"""Hugging Face format: load BERT checkpoints into our model, export ours so that
transformers.AutoModelForMaskedLM.from_pretrained loads it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from data_prep.files import fsync_tree, replace_dir

from .errors import UserError, writing
from .model import TIED_DECODER, TIED_DECODER_BIAS, WORD_EMBEDDINGS, BertConfig, BertForMLM, is_gate
from .prune import prune_state_dict
from .settings import check_value, json_object


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# A pruned export's auto_map: every transformers Auto class a BERT fine-tuning needs, each to its
# class in modeling_earlybert.py (which registers the same table; a test keeps the two equal).
AUTO_MAP = {auto: f"modeling_earlybert.EarlyBert{cls}" for auto, cls in (
    ("AutoConfig", "Config"), ("AutoModel", "Model"), ("AutoModelForMaskedLM", "ForMaskedLM"),
    ("AutoModelForSequenceClassification", "ForSequenceClassification"),
    ("AutoModelForTokenClassification", "ForTokenClassification"),
    ("AutoModelForQuestionAnswering", "ForQuestionAnswering"),
    ("AutoModelForMultipleChoice", "ForMultipleChoice"))}


def hf_config_dict(c: BertConfig, special_ids: dict[str, int] | None = None) -> dict:
    """transformers' config.json for C: plain `bert` when every layer has the full size,
    `earlybert` (with AUTO_MAP) when layers differ. special_ids: see special_token_ids."""
    uniform = len(set(c.heads)) == 1 and len(set(c.ffn)) == 1 and c.heads[0] * c.head_size == c.hidden_size
    d = {
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.heads[0], "intermediate_size": c.ffn[0], "hidden_act": "gelu",
        "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.attention_dropout,
        "max_position_embeddings": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size,
        "initializer_range": c.initializer_range, "layer_norm_eps": c.layer_norm_eps,
        "pad_token_id": 0, "tie_word_embeddings": True,  # pad 0: transformers' default, without a tokenizer
        **(special_ids or {}),
    }
    if not uniform:  # per-layer sizes: pipeline/modeling_earlybert.py, shipped beside the weights
        d.update(model_type="earlybert", architectures=["EarlyBertForMaskedLM"],
                 num_attention_heads=c.hidden_size // c.head_size, intermediate_size=max(c.ffn),
                 earlybert_heads=list(c.heads), earlybert_ffn=list(c.ffn), earlybert_head_size=c.head_size,
                 auto_map=dict(AUTO_MAP))
    return d


def special_token_ids(tokenizer_dir: Path | str) -> dict[str, int]:
    """The config fields transformers takes from the tokenizer (pad_token_id), read from the
    tokenizer in TOKENIZER_DIR: its padding token (tokenizer_config.json or special_tokens_map.json,
    else "[PAD]") looked up in tokenizer.json or vocab.txt."""
    d = Path(tokenizer_dir)
    pad = "[PAD]"
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later one wins
        if (d / name).exists():
            value = json_object(d / name).get("pad_token", pad)
            value = value.get("content", pad) if isinstance(value, dict) else value
            pad = check_value(value, str, f"{d / name}: field 'pad_token'")
    if (d / "tokenizer.json").exists():
        try:
            pad_id = Tokenizer.from_file(str(d / "tokenizer.json")).token_to_id(pad)
        except Exception as e:  # the tokenizers library raises its own exception type for a bad file
            raise UserError(f"{d / 'tokenizer.json'}: not a tokenizer ({_first_line(e)})") from None
        source = d / "tokenizer.json"
    elif (d / "vocab.txt").exists():
        try:
            vocab = (d / "vocab.txt").read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{d / 'vocab.txt'}: cannot be read ({e})") from None
        pad_id = vocab.index(pad) if pad in vocab else None
        source = d / "vocab.txt"
    else:
        raise UserError(f"{d}: no tokenizer.json or vocab.txt")
    if pad_id is None:
        raise UserError(f"{source}: the padding token {pad!r} is not in the vocabulary")
    return {"pad_token_id": pad_id}


def _first_line(e: Exception) -> str:
    """An error's message without the C++ frames or the explanations torch appends."""
    return (str(e).splitlines() or [""])[0][:200]


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The weights in DIRECTORY; a file that does not hold a state dict: UserError naming it."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = directory / name
        if not path.exists():
            continue
        try:
            if name == "model.safetensors":
                sd = load_file(str(path))
            else:  # weights_only: tensors and plain containers, never arbitrary objects
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # safetensors, the unpickler and zip each raise their own errors for a foreign file
            raise UserError(f"{path}: not readable weights ({type(e).__name__}: {_first_line(e)})") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise UserError(f"{path}: does not hold a state dict (names to tensors)")
        return sd
    raise UserError(f"{directory}: no model.safetensors or pytorch_model.bin")


def load_pretrained(directory: Path | str, weights: dict[str, torch.Tensor] | None = None,
                    **overrides) -> BertForMLM:
    """A `bert-*` checkpoint directory (BertForMaskedLM, BertForPreTraining or BertModel keys).
    A missing MLM head is freshly initialised. weights: its read_state_dict, when the caller has it."""
    directory = Path(directory)
    config = BertConfig.from_json(directory / "config.json", **overrides)
    theirs = {k if k.startswith(("bert.", "cls.")) else "bert." + k: v
              for k, v in (read_state_dict(directory) if weights is None else weights).items()}
    layers = {k.split(".")[3] for k in theirs if k.startswith("bert.encoder.layer.") and k.count(".") > 3}
    if config.num_layers > len(layers):
        raise UserError(f"{directory}: config.json has {config.num_layers} layers, the weights {len(layers)}")
    try:  # the shapes the config implies, before memory is spent on them
        with torch.device("meta"):
            ours = BertForMLM(config).state_dict()
    except (RuntimeError, TypeError, OverflowError) as e:  # sizes past int64: torch's "Storage size
        # calculation overflowed" (RuntimeError) or "Overflow when unpacking long" (TypeError)
        raise UserError(f"{directory / 'config.json'}: sizes no tensor can hold "
                        f"({_first_line(e)})") from None
    mapped = {name: v for name, v in theirs.items() if name in ours}
    missing = [k for k in ours if k not in mapped and not k.startswith("cls.") and not is_gate(k)]
    if missing:
        raise UserError(f"{directory}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, v in mapped.items():
        if v.shape != ours[k].shape:
            raise UserError(f"{directory}: {k} has shape {tuple(v.shape)}, the config says {tuple(ours[k].shape)}")
        if v.dtype.is_complex:
            raise UserError(f"{directory}: {k} is {v.dtype}, expected real numbers")
    if TIED_DECODER not in mapped:
        mapped[TIED_DECODER] = mapped[WORD_EMBEDDINGS]
    model = BertForMLM(config)
    model.load_state_dict(mapped, strict=False)
    return model


def folded_state_dict(model: BertForMLM, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The weights (fp32) with every gate folded into the layer that follows it, gates dropped:
    the result computes exactly what the gated model computes."""
    c = model.config
    keep_all = [np.ones(n, dtype=bool) for n in c.heads], [np.ones(n, dtype=bool) for n in c.ffn]
    return prune_state_dict(model.state_dict() if state_dict is None else state_dict, c, *keep_all)


def export(model: BertForMLM, out: Path | str, tokenizer_dir: Path | str | None,
           state_dict: dict | None = None, extra: dict[str, dict] | None = None, config: dict | None = None) -> None:
    """Writes OUT (model.safetensors, config.json, tokenizer, and `extra` JSON files) through a
    temporary directory renamed into place. config: config.json's content (default: the masked
    LM's, hf_config_dict; a fine-tuned model gives its head's)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    sd = state_dict if state_dict is not None else folded_state_dict(model)
    # safetensors refuses shared storage: the decoder weight is tied to the word embeddings.
    sd = {k: v.contiguous() for k, v in sd.items() if k not in (TIED_DECODER, TIED_DECODER_BIAS)}
    if config is None:
        config = hf_config_dict(model.config, None if tokenizer_dir is None else special_token_ids(tokenizer_dir))
    with writing(out, partial=[tmp]):  # out of space: the partial copy goes, OUT stays
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
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
    replace_dir(tmp, out)
