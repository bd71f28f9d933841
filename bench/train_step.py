"""Training-step benchmark (a benchmark, not a test).

In one run: our training step (forward, backward, AdamW step) against transformers'
BertForMaskedLM at the same shape and batch, for bert-small and bert-medium at sequence length
128; our achieved FLOP/s against the same run's matmul rate in that dtype; and DeepSpeed ZeRO-2
on one rank against plain torch with our model. Prints a table and writes JSON.

    python bench/train_step.py [--dtype bf16|fp32 ...] [--batch 8] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if "RANK" not in os.environ:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

import torch  # noqa: E402

from pipeline.model import PRESETS, BertConfig, BertForMLM  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def batch(b: int, L: int, vocab: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (b, L), generator=g)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(b, L, generator=g) < 0.15
    labels[pick] = ids[pick]
    seg = torch.zeros(b, L, dtype=torch.int32)
    seg[:, L // 2:] = 1  # two documents per sequence
    return ids.to(device), labels.to(device), seg.to(device)


def timed(step, steps: int) -> float:
    step()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def matmul_rate(dtype, device, n: int = 2048) -> float:
    x, y = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n ** 3 / timed(lambda: x @ y, 3)


def ours_step(name, dtype, b, L, device):
    torch.manual_seed(0)
    model = BertForMLM(BertConfig.preset(name)).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, labels, seg = batch(b, L, model.config.vocab_size, device)

    def step():
        loss, _, _ = model(ids, segment_ids=seg, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, timed(step, ARGS.steps)


def hf_step(name, dtype, b, L, device):
    from transformers import BertConfig as HFConfig, BertForMaskedLM
    layers, hidden, heads = PRESETS[name]
    torch.manual_seed(0)
    model = BertForMaskedLM(HFConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                     intermediate_size=4 * hidden, attn_implementation="sdpa")).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, labels, _ = batch(b, L, 30522, device)

    def step():
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, ARGS.steps)


def deepspeed_step(name, dtype, b, L, device):
    import deepspeed
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    torch.manual_seed(0)
    model = BertForMLM(BertConfig.preset(name))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = {"train_micro_batch_size_per_gpu": b, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}
    if dtype == torch.bfloat16:
        cfg["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    ids, labels, seg = batch(b, L, model.config.vocab_size, device)

    def step():
        loss, _, _ = engine(ids, segment_ids=seg, labels=labels)
        engine.backward(loss)
        engine.step()
    return timed(step, ARGS.steps)


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--models", nargs="+", default=["bert-small", "bert-medium"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "train_step.json")
    ARGS = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, out = [], {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "threads": torch.get_num_threads(), "batch": ARGS.batch, "seq_len": ARGS.seq_len, "results": []}
    for dname in ARGS.dtype:
        dtype = DTYPES[dname]
        peak = matmul_rate(dtype, device)
        for name in ARGS.models:
            model, ours = ours_step(name, dtype, ARGS.batch, ARGS.seq_len, device)
            flops = model.flops_per_sequence(ARGS.seq_len, 0.15) * ARGS.batch
            del model
            hf = hf_step(name, dtype, ARGS.batch, ARGS.seq_len, device)
            r = {"dtype": dname, "model": name, "ours_s": ours, "hf_s": hf, "ratio_ours_to_hf": ours / hf,
                 "ours_flops_per_s": flops / ours, "matmul_flops_per_s": peak,
                 "fraction_of_matmul_rate": flops / ours / peak}
            if name == ARGS.models[0]:
                ds = deepspeed_step(name, dtype, ARGS.batch, ARGS.seq_len, device)
                r.update(deepspeed_zero2_s=ds, deepspeed_over_torch=ds / ours)
            out["results"].append(r)
            rows.append(r)
            print(f"{dname} {name}: ours {ours:.3f}s  hf {hf:.3f}s  ratio {ours / hf:.2f}  "
                  f"{flops / ours / 1e9:.1f} GFLOP/s = {flops / ours / peak:.0%} of matmul "
                  f"({peak / 1e9:.1f} GFLOP/s)" + (f"  zero2 {r['deepspeed_zero2_s']:.3f}s "
                                                    f"({r['deepspeed_over_torch']:.2f}x torch)" if "deepspeed_zero2_s" in r else ""),
                  flush=True)
    print("\n| dtype | model | ours s/step | HF s/step | ours/HF (target <= 0.6) | ours GFLOP/s | % of matmul (target >= 50 %) | ZeRO-2 / torch (target <= 1.10) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        zs = f"{r['deepspeed_over_torch']:.2f}" if "deepspeed_over_torch" in r else ""
        print(f"| {r['dtype']} | {r['model']} | {r['ours_s']:.3f} | {r['hf_s']:.3f} | {r['ratio_ours_to_hf']:.2f} | "
              f"{r['ours_flops_per_s'] / 1e9:.1f} | {r['fraction_of_matmul_rate']:.0%} | {zs} |")
    ARGS.json.parent.mkdir(parents=True, exist_ok=True)
    ARGS.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {ARGS.json}")


if __name__ == "__main__":
    main()
