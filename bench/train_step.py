"""Training-step benchmark (a benchmark, not a test).

In one run, per model and dtype: our training step (forward, backward, AdamW step) with each
attention path (masked SDPA; variable-length flash attention on CUDA, attention dropout 0) and,
with --compile, torch.compile; the trainer's DeepSpeed engine on one rank with shipped configs
(default zero0_bf16 and zero2_bf16); and transformers' BertForMaskedLM (SDPA) at the same shape and batch.
Tokens/s, MFU (our model's FLOPs with attention per document, against the datasheet peak of a
known GPU or the measured matmul rate), ours/HF step time, peak memory and, with --data, the
time a step waits for the loader thread (real packed batches). Prints a table and writes JSON.

    python -m bench.train_step [--models bert-base bert-large] [--dtype bf16] [--batch 128]
        [--steps 10] [--data bench/gpu_data] [--compile] [--json OUT]
Defaults: on CUDA bert-base and bert-large, bf16, batch 128; on a CPU bert-small and
bert-medium, bf16 and fp32, batch 8.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time
from functools import partial
from pathlib import Path

import torch

from pipeline.mfu import peak_flops
from pipeline.model import PRESETS, VARLEN, BertConfig, BertForMLM

ROOT = Path(__file__).resolve().parent.parent  # the checkout: ds_configs/ and bench/out/
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CUDA = torch.cuda.is_available()


def batch(b: int, L: int, vocab: int, device):
    """Synthetic: two documents per sequence, 15 % predicted."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (b, L), generator=g)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(b, L, generator=g) < 0.15
    labels[pick] = ids[pick]
    seg = torch.zeros(b, L, dtype=torch.int32)
    seg[:, L // 2:] = 1
    return ids.to(device), labels.to(device), seg.to(device)


def synced():
    if CUDA:
        torch.cuda.synchronize()


def timed(step, steps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    synced()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    synced()
    return (time.perf_counter() - t) / steps


class Batches:
    """Real packed batches through the trainer's loader thread (--data), or one synthetic batch."""

    def __init__(self, args, vocab: int, device):
        self.device, self.loader = device, None
        if args.data is not None:
            from data_prep.reader import MaskingCollator, PackedDataset, ResumableSampler
            from pipeline.loader import Prefetcher
            ds = PackedDataset(args.data, "train")
            m = ds.manifest
            if m["seq_len"] != args.seq_len or m["vocab_size"] != vocab:
                raise SystemExit(f"{args.data}: seq_len {m['seq_len']}, vocabulary {m['vocab_size']}; "
                                 f"the benchmark wants {args.seq_len} and {vocab}")
            self.loader = Prefetcher(ds, partial(ResumableSampler, len(ds)), MaskingCollator(vocab, m["special_tokens"]),
                                     args.batch, 0, 0, pin=device.type == "cuda")
        else:
            ids, labels, seg = batch(args.batch, args.seq_len, vocab, "cpu")
            from pipeline.model import cu_seqlens
            self.fixed = {"input_ids": ids, "labels": labels, "segment_ids": seg, "cu_seqlens": cu_seqlens(seg),
                          "mlm_index": torch.nonzero(labels.reshape(-1) != -100).squeeze(1),
                          "attention_pairs": ids.shape[0] * 2 * (ids.shape[1] // 2) ** 2}
            self.on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.fixed.items()}

    def next(self) -> dict:
        if self.loader is None:
            return self.on_device
        from pipeline.loader import to_device
        b, _ = self.loader.next()
        return {**to_device(b, self.device), "attention_pairs": b["attention_pairs"]}

    @property
    def wait_s(self) -> float:
        return self.loader.wait_s if self.loader else 0.0

    def close(self):
        if self.loader:
            self.loader.close()


def make_ours(name, dtype, device, attention: str, compile_: bool):
    layers, hidden, heads = PRESETS[name]
    torch.manual_seed(0)
    c = BertConfig.preset(name, attention_dropout=0.0 if attention == "varlen" else 0.1)
    model = BertForMLM(c).to(device=device, dtype=dtype)
    model.set_attention(attention)
    if compile_:
        model.compile()
    return model


def ours_row(name, dtype, device, args, attention="sdpa", compile_=False) -> dict:
    model = make_ours(name, dtype, device, attention, compile_)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    data = Batches(args, model.config.vocab_size, device)
    flops = [0.0]

    def step():
        b = data.next()
        loss, n, _ = model(b["input_ids"], segment_ids=b["segment_ids"], labels=b["labels"],
                           cu_seqlens=b["cu_seqlens"], mlm_index=b["mlm_index"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        flops[0] += model.flops(b["input_ids"].numel(), b["attention_pairs"], n)
    return measure(step, data, flops, args, model, compile_)


def measure(step, data, flops, args, model, compile_) -> dict:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    warm = 3 if compile_ else 1
    for _ in range(warm):
        step()
    synced()
    flops[0], wait0 = 0.0, data.wait_s
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    synced()
    dt = (time.perf_counter() - t) / args.steps
    data.close()
    return {"step_s": dt, "tokens_per_s": args.batch * args.seq_len / dt, "flops_per_s": flops[0] / args.steps / dt,
            "data_wait_s": (data.wait_s - wait0) / args.steps,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if CUDA else None}


def deepspeed_row(name, dtype, device, args, config: Path) -> dict:
    """The trainer's engine: a shipped DeepSpeed config at this batch, our AdamW (as train.py)."""
    import deepspeed
    if not CUDA:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if CUDA else "gloo")
    from pipeline.optim import make_optimizer
    torch.manual_seed(0)
    model = BertForMLM(BertConfig.preset(name))
    cfg = json.loads(config.read_text())
    cfg.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1, train_batch_size=args.batch)
    cfg.pop("scheduler", None)
    if dtype == torch.float32:
        for key in ("bf16", "fp16", "torch_autocast"):
            cfg.pop(key, None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg, device), config=cfg)
    data = Batches(args, model.config.vocab_size, device)
    flops = [0.0]

    def step():
        b = data.next()
        loss, n, _ = engine(b["input_ids"], segment_ids=b["segment_ids"], labels=b["labels"],
                            cu_seqlens=b["cu_seqlens"], mlm_index=b["mlm_index"])
        engine.backward(loss)
        engine.step()
        flops[0] += model.flops(b["input_ids"].numel(), b["attention_pairs"], n)
    row = measure(step, data, flops, args, model, False)
    engine.destroy()
    return row


def hf_row(name, dtype, device, args) -> dict:
    from transformers import BertConfig as HFConfig, BertForMaskedLM
    layers, hidden, heads = PRESETS[name]
    torch.manual_seed(0)
    model = BertForMaskedLM(HFConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                     intermediate_size=4 * hidden, attn_implementation="sdpa")).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    data = Batches(args, 30522, device)

    def step():
        b = data.next()
        model(input_ids=b["input_ids"], labels=b["labels"]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return measure(step, data, [0.0], args, model, False)


def table(out: dict) -> str:
    """The benchmark's JSON as a Markdown table (also printed by bench/gpu.sh's summary)."""
    def f(v, fmt):
        return fmt.format(v) if v is not None else ""
    lines = [f"batch {out['batch']} x seq {out['seq_len']}, {out['device']}, data {out['data']}",
             "| dtype | model | variant | s/step | tokens/s | MFU | / HF step | peak GiB | data wait s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['model']} | {r['variant']} | failed: {r['error'][:60]} | | | | | |")
            continue
        lines.append(f"| {r['dtype']} | {r['model']} | {r['variant']} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | "
                     f"{f(r.get('mfu'), '{:.1%}')} | {f(r.get('over_hf'), '{:.2f}')} | "
                     f"{f(r['peak_memory_gib'], '{:.1f}')} | {r['data_wait_s']:.4f} |")
    lines += [f"peak {d}: {p['flops_per_s'] / 1e12:.1f} TFLOP/s ({p['source']})" for d, p in out["peak"].items()]
    return "\n".join(lines)


def single_process_env() -> None:
    """A world of one for DeepSpeed's engine when not started by a launcher."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))


def main() -> None:
    single_process_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", nargs="+", default=["bf16"] if CUDA else ["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--models", nargs="+", default=["bert-base", "bert-large"] if CUDA else ["bert-small", "bert-medium"])
    ap.add_argument("--batch", type=int, default=128 if CUDA else 8)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10 if CUDA else 3)
    ap.add_argument("--data", type=Path, default=None, help="a data_prep output (bert-base vocabulary) to feed real batches")
    ap.add_argument("--compile", action="store_true", help="also time our model under torch.compile (first model)")
    ap.add_argument("--deepspeed", nargs="*", type=Path,
                    default=[ROOT / "ds_configs" / f for f in (("zero0_bf16.json", "zero2_bf16.json") if CUDA else ("cpu.json",))],
                    help="DeepSpeed configs to time the trainer's engine with (first model only; none: skip)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "train_step.json")
    args = ap.parse_args()
    device = torch.device("cuda" if CUDA else "cpu")
    out = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "batch": args.batch, "seq_len": args.seq_len,
           "data": str(args.data) if args.data else "synthetic", "results": []}
    for dname in args.dtype:
        dtype = DTYPES[dname]
        peak, source = peak_flops(device, dtype)
        out.setdefault("peak", {})[dname] = {"flops_per_s": peak, "source": source}
        for name in args.models:
            variants = [("ours sdpa", lambda: ours_row(name, dtype, device, args))]
            if CUDA and VARLEN is not None and dtype != torch.float32:
                variants.append(("ours varlen", lambda: ours_row(name, dtype, device, args, "varlen")))
            if args.compile and name == args.models[0]:
                variants.append(("ours sdpa compiled", lambda: ours_row(name, dtype, device, args, compile_=True)))
            if name == args.models[0]:
                for config in args.deepspeed:
                    variants.append((f"deepspeed {config.stem}", lambda c=config: deepspeed_row(name, dtype, device, args, c)))
            variants.append(("hf sdpa", lambda: hf_row(name, dtype, device, args)))
            rows = {}
            for label, fn in variants:
                try:
                    rows[label] = fn()
                except Exception as e:  # one failing variant must not hide the others' figures
                    print(f"{dname} {name} {label}: failed: {type(e).__name__}: {e}", flush=True)
                    rows[label] = {"error": f"{type(e).__name__}: {e}"}
                if CUDA:
                    torch.cuda.empty_cache()
            hf = rows["hf sdpa"].get("step_s")
            for label, r in rows.items():
                if "error" not in r:
                    r["mfu"] = r["flops_per_s"] / peak if r["flops_per_s"] else None
                    r["over_hf"] = r["step_s"] / hf if hf and label != "hf sdpa" else None
                out["results"].append({"dtype": dname, "model": name, "variant": label, **r})
                print(f"{dname} {name} {label}: {json.dumps(r)}", flush=True)
    print("\n" + table(out))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
