"""EarlyBERT ticket benchmark (a benchmark, not a test).

In one run: the training-step time (forward, backward, AdamW) of the dense model, of the gated
dense model (the searching stage) and of a ticket (the paper's shape: 4 of 12 heads dropped in
every layer, 30 % of FFN neurons dropped globally, drawn from random gates), against the ratio
of their FLOPs. One ticket per --ffn_multiple value (1: the paper's arbitrary FFN widths; 64:
every layer's width a multiple of 64), all drawn from the same gates; dense and gated are timed
once per dtype. Target: the realised speed-up (dense time / ticket time) at least 90 % of the
FLOPs-predicted one (dense FLOPs / ticket FLOPs) on CPU, 95 % on a GPU with bert-base.
Prints a table and writes bench/out/earlybird.json.

    python -m bench.earlybird [--dtype bf16 fp32] [--layers 6 --hidden 384 --heads 12 --ffn 1536]
        [--seq 128 --batch 2 --steps 2] [--ffn_multiple 1 64]
        # on a GPU: --layers 12 --hidden 768 --ffn 3072
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.train_step import batch, timed
from pipeline.earlybird import draw_masks
from pipeline.model import BertConfig, BertForMLM
from pipeline.prune import pruned_config

ROOT = Path(__file__).resolve().parent.parent  # the checkout: ds_configs/ and bench/out/
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def step_time(config: BertConfig, dtype, a, device) -> float:
    torch.manual_seed(0)
    model = BertForMLM(config).to(device=device, dtype=dtype)
    if config.gates:
        model.l1 = 1e-4
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, labels, seg = batch(a.batch, a.seq, config.vocab_size, device)

    def step():
        loss, _, _ = model(ids, segment_ids=seg, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, a.steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--prune_heads", type=int, default=4)
    p.add_argument("--prune_ffn", type=float, default=0.3)
    p.add_argument("--ffn_multiple", type=int, nargs="+", default=[1, 64],
                   help="one ticket per value: FFN widths in multiples of it")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "earlybird.json")
    a = p.parse_args()
    if any(n < 1 for n in a.ffn_multiple):
        p.error(f"--ffn_multiple {' '.join(map(str, a.ffn_multiple))}: each must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dense = BertConfig(vocab_size=a.vocab, hidden_size=a.hidden, heads=[a.heads] * a.layers,
                       ffn=[a.ffn] * a.layers, head_size=a.hidden // a.heads, max_position_embeddings=max(512, a.seq),
                       dropout=0.0, attention_dropout=0.0)
    rng = np.random.default_rng(0)  # trained gates stand-in: the ticket's shape is what matters here
    gates = ([rng.random(a.heads) for _ in range(a.layers)], [rng.random(a.ffn) for _ in range(a.layers)])
    tickets = {}  # ffn_multiple -> the ticket's config, all from the same gates
    for n in dict.fromkeys(a.ffn_multiple):
        heads, ffn = draw_masks(*gates, a.prune_heads, a.prune_ffn, ffn_multiple=n)
        tickets[n] = pruned_config(dense, heads, ffn)
    with torch.device("meta"):
        flops = {"dense": BertForMLM(dense).flops_per_sequence(a.seq, 0.15)}
        flops.update({f"ticket_x{n}": BertForMLM(c).flops_per_sequence(a.seq, 0.15) for n, c in tickets.items()})
    rows = []
    for dt in a.dtype:
        t_dense = step_time(dense, DTYPES[dt], a, device)
        t_gated = step_time(replace(dense, gates=True), DTYPES[dt], a, device)
        for n, ticket in tickets.items():
            t_ticket = step_time(ticket, DTYPES[dt], a, device)
            realised, predicted = t_dense / t_ticket, flops["dense"] / flops[f"ticket_x{n}"]
            rows.append({"dtype": dt, "ffn_multiple": n, "ticket_ffn": ticket.ffn, "dense_s": t_dense,
                         "gated_s": t_gated, "ticket_s": t_ticket, "realised_speedup": realised,
                         "flops_speedup": predicted, "realised_over_predicted": realised / predicted})
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(a).items()},
            "tickets": [{"ffn_multiple": n, "heads": c.heads, "ffn": c.ffn} for n, c in tickets.items()],
            "flops_per_sequence": flops, "rows": rows}
    print(f"dense {a.layers}x{a.hidden}, {a.heads} heads, FFN {a.ffn}, seq {a.seq}, batch {a.batch}, "
          f"vocab {a.vocab}; ticket heads {next(iter(tickets.values())).heads}")
    print(f"{'dtype':<6} {'multiple':>8} {'dense s':>9} {'gated s':>9} {'ticket s':>9} {'speed-up':>9} "
          f"{'FLOPs':>7} {'realised/FLOPs':>15}  ticket FFN widths")
    for r in rows:
        print(f"{r['dtype']:<6} {r['ffn_multiple']:>8} {r['dense_s']:>9.3f} {r['gated_s']:>9.3f} "
              f"{r['ticket_s']:>9.3f} {r['realised_speedup']:>9.3f} {r['flops_speedup']:>7.3f} "
              f"{r['realised_over_predicted']:>15.1%}  {r['ticket_ffn']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
