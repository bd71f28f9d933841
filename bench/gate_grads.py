"""How strong is the L1 term against the gates' own gradient? (a benchmark, not a test)

Under Adam every coordinate moves by about the LR per step whatever the size of its gradient. A gate
whose MLM gradient is much smaller than --l1 therefore moves down at the full LR like every other
such gate: the L1 term, not the data, decides its value, and the masks drawn from those gates are
near-ties (bench/RESULTS.md, issue 11). This measures, for a model on real data, the MLM gradient
of every head and FFN gate (no L1) over B micro batches, and the fraction of gates whose mean
gradient is smaller than --l1: the L1-dominated ones.

    python -m bench.gate_grads --data DATA --model PRESET|CONFIG.json [--weights RUN/init.safetensors|RUN/checkpoints/ticket-N]
        [--batches 16] [--micro 16] [--l1 1e-4] [--device cpu|cuda] [--json PATH]

--weights: a gated model's weights, as safetensors (RUN/init.safetensors: the weights the search
began from) or a checkpoint directory of the searching stage (RUN/checkpoints/ticket-N: the weights
the ticket was drawn from); default: the model's initialisation with --seed. Prints a table and writes
bench/out/gate_grads.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from data_prep.reader import MaskingCollator, PackedDataset
from pipeline.loader import FORWARD_KEYS, to_device
from pipeline.model import PRESETS, BertConfig, BertForMLM
from pipeline.trusted import DEEPSPEED_GLOBALS

ROOT = Path(__file__).resolve().parent.parent


def gated_model(model: str, vocab_size: int, weights: Path | None, seed: int) -> BertForMLM:
    torch.manual_seed(seed)
    if model in PRESETS:
        config = BertConfig.preset(model, vocab_size=vocab_size, gates=True)
    else:
        config = BertConfig.from_json(model, gates=True)
    m = BertForMLM(config)
    if weights is not None:
        if weights.is_dir():  # a DeepSpeed checkpoint of RUN/checkpoints/: its module states, data only
            with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
                state = torch.load(weights / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
        else:
            state = load_file(str(weights))
        missing, unexpected = m.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("cls.predictions.decoder.")]:  # tied
            raise SystemExit(f"{weights}: not this model's weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return m


def gate_gradients(m: BertForMLM, data: Path, batches: int, micro: int, seed: int, device) -> dict:
    """{"heads": [batches, n], "ffn": [batches, n]}: each micro batch's MLM gradient of every gate."""
    manifest = json.loads((data / "manifest.json").read_text())
    ds = PackedDataset(data)
    if len(ds) < batches * micro:
        raise SystemExit(f"{data}: {len(ds)} training sequences, fewer than --batches x --micro")
    collate = MaskingCollator(manifest["vocab_size"], manifest["special_tokens"])
    gen = torch.Generator().manual_seed(seed)
    m.to(device).train()
    m.l1 = 0.0
    gates = {kind: [p for n, p in m.named_parameters() if n.endswith(f"{kind}_gates")] for kind in ("head", "ffn")}
    out = {"heads": [], "ffn": []}
    for b in range(batches):
        batch = collate(*ds.batch(range(b * micro, (b + 1) * micro)), gen)
        m.zero_grad(set_to_none=True)
        loss = m(**to_device({k: batch[k] for k in FORWARD_KEYS if k in batch}, device))[0]
        loss.backward()
        out["heads"].append(torch.cat([p.grad.flatten() for p in gates["head"]]).cpu().numpy())
        out["ffn"].append(torch.cat([p.grad.flatten() for p in gates["ffn"]]).cpu().numpy())
    return {k: np.stack(v).astype(np.float64) for k, v in out.items()}


def summary(g: np.ndarray, l1: float) -> dict:
    mean = np.abs(g.mean(axis=0))
    return {"gates": int(g.shape[1]), "batch_abs_median": float(np.median(np.abs(g))),
            "mean_abs_median": float(np.median(mean)), "mean_abs_p10": float(np.quantile(mean, 0.1)),
            "mean_abs_p90": float(np.quantile(mean, 0.9)), "l1_dominated": float((mean < l1).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a data_prep output")
    p.add_argument("--model", required=True, help="a preset or a JSON model config")
    p.add_argument("--weights", type=Path, help="a gated model's safetensors or searching-stage checkpoint "
                                                "directory (default: the initialisation)")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--l1", type=float, default=1e-4, help="the L1 coefficient to compare against")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "gate_grads.json")
    a = p.parse_args()
    vocab = json.loads((a.data / "manifest.json").read_text())["vocab_size"]
    m = gated_model(a.model, vocab, a.weights, a.seed)
    grads = gate_gradients(m, a.data, a.batches, a.micro, a.seed, torch.device(a.device))
    rows = {kind: summary(g, a.l1) for kind, g in grads.items()}
    print(f"MLM gradient of the gates: {a.model}, {a.batches} micro batches of {a.micro}, "
          f"{'weights ' + str(a.weights) if a.weights else 'at initialisation'}; --l1 {a.l1:g}")
    print("| gates | n | median abs, one batch | median abs of the mean | p10 / p90 of it | mean below --l1 |")
    print("|---|---|---|---|---|---|")
    for kind, r in rows.items():
        print(f"| {kind} | {r['gates']:,} | {r['batch_abs_median']:.2e} | {r['mean_abs_median']:.2e} | "
              f"{r['mean_abs_p10']:.2e} / {r['mean_abs_p90']:.2e} | {r['l1_dominated']:.0%} |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"model": a.model, "weights": str(a.weights) if a.weights else None,
                                  "batches": a.batches, "micro": a.micro, "l1": a.l1, "gates": rows}, indent=1))


if __name__ == "__main__":
    main()
