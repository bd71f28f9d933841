"""SQuAD for a BERT: questions and contexts cut into features of at most MAX_LEN tokens with a
document stride (a long context becomes overlapping windows, each with the question), the answer's
token span in each window (the [CLS] position where the window does not hold it, and for
unanswerable questions), and back from start/end logits to answer text through the offsets.
Needs a fast tokenizer (offset mappings)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .tasks import SquadExample


@dataclass
class Features:
    input_ids: np.ndarray        # [features, max_len]
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    start: np.ndarray            # [features] the answer's first token, 0 ([CLS]) when not inside
    end: np.ndarray
    example: np.ndarray          # [features] index of the example each feature comes from
    offsets: list[list[tuple[int, int] | None]]  # per token: its characters in the context, None outside


def featurize(examples: list[SquadExample], tokenizer, max_len: int = 384, stride: int = 128) -> Features:
    """Windows of each context with its question (truncated to a quarter of the window, at most
    64 tokens as in BERT's SQuAD recipe); `stride` tokens of overlap between a context's windows.
    The labelled answer is the first gold one."""
    max_question = min(64, max_len // 4)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("SQuAD needs a fast tokenizer (tokenizer.json) for its offset mappings")
    if stride >= max_len - max_question - 3:
        raise UserError(f"--doc_stride {stride}: must be below max_seq_len - question - 3 "
                        f"({max_len - max_question - 3})")
    questions = [tokenizer.convert_tokens_to_string(tokenizer.tokenize(e.question.lstrip())[:max_question])
                 for e in examples]
    enc = tokenizer(questions, [e.context for e in examples], truncation="only_second", max_length=max_len,
                    stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                    padding="max_length")
    starts, ends, offsets = [], [], []
    for i, mapping in enumerate(enc["offset_mapping"]):
        seq = enc.sequence_ids(i)
        ctx = [j for j, s in enumerate(seq) if s == 1]
        ex = examples[enc["overflow_to_sample_mapping"][i]]
        offsets.append([tuple(mapping[j]) if seq[j] == 1 else None for j in range(len(seq))])
        s = e = 0
        if ex.answers and ctx:
            a0 = ex.starts[0]
            a1 = a0 + len(ex.answers[0])
            if mapping[ctx[0]][0] <= a0 and mapping[ctx[-1]][1] >= a1:
                s = next(j for j in ctx if mapping[j][1] > a0)
                e = next(j for j in reversed(ctx) if mapping[j][0] < a1)
        starts.append(s)
        ends.append(e)
    token_types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
    return Features(np.array(enc["input_ids"]), np.array(enc["attention_mask"]), np.array(token_types),
                    np.array(starts), np.array(ends), np.array(enc["overflow_to_sample_mapping"]), offsets)


def decode(examples: list[SquadExample], f: Features, start_logits: np.ndarray, end_logits: np.ndarray,
           v2: bool, n_best: int = 20, max_answer: int = 30) -> dict[str, str]:
    """Each question's answer: the best-scoring span (start + end logit) over its windows, within
    the context and at most max_answer tokens; with v2, "" when the [CLS] score of some window
    beats it (the null answer, threshold 0)."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for i in range(len(f.example)):
        k, offs = int(f.example[i]), f.offsets[i]
        s_log, e_log = start_logits[i], end_logits[i]
        null[k] = min(null.get(k, np.inf), float(s_log[0] + e_log[0]))
        for s in np.argsort(s_log)[::-1][:n_best]:
            for e in np.argsort(e_log)[::-1][:n_best]:
                if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_answer:
                    continue
                score = float(s_log[s] + e_log[e])
                if k not in best or score > best[k][0]:
                    best[k] = (score, examples[k].context[offs[s][0]:offs[e][1]])
    out = {}
    for k, ex in enumerate(examples):
        score, text = best.get(k, (-np.inf, ""))
        out[ex.id] = "" if v2 and null.get(k, -np.inf) > score else text
    return out
