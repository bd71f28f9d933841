"""Client optimizers for DeepSpeed: the trainer builds the optimizer itself from the config's
`optimizer` block, so no DeepSpeed op has to be compiled and LAMB's trust ratio is computed per
model parameter.

LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
Algorithm 2) takes one trust ratio per parameter tensor, so it must see the model's real
parameters. Under ZeRO 1/2/3 (and DeepSpeed's BF16_Optimizer) the client optimizer is handed one
flat fp32 partition per parameter group instead, so a "per-layer" ratio would be one ratio over a
rank's slice of the whole group; at stage 0, DeepSpeed's `bf16` mode wraps it in
FP16_UnfusedOptimizer (per-parameter fp32 copies, but bf16 gradient accumulation and one optimizer
step on zero gradients at start-up, which moves the weights under decoupled weight decay). The LAMB
config therefore runs ZeRO stage 0 with `torch_autocast` bf16 (fp32 parameters, gradients and
optimizer state; bf16 matmuls), where DeepSpeed passes the client optimizer through unwrapped
(`ds_configs/zero0_bf16_lamb.json`).
"""

from __future__ import annotations

import math

import torch

SUPPORTED = ("AdamW", "LAMB")


class Lamb(torch.optim.Optimizer):
    """LAMB, Algorithm 2 of You et al. 2019, per parameter tensor x with gradient g at step t:

        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
        r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * x
        x = x - lr * phi(||x||) / ||r|| * r

    phi is the identity (the paper leaves it a general scaling function); the ratio
    phi(||x||)/||r|| is 1 where either norm is 0 (a zero-initialised bias, or a zero update).
    `max_trust_ratio`, when set, clamps the ratio to [0, max_trust_ratio] (DeepSpeed's LAMB used 10
    as its `max_coeff`); None (default) leaves it unclamped. Weight decay is decoupled (part of r, scaled by the trust
    ratio) and per group: groups with weight_decay 0 (biases, LayerNorm, EarlyBERT gates) still get
    their trust ratio. No gradient clipping here: that is DeepSpeed's `gradient_clipping`.

    State per parameter: step (a Python int, so the bias corrections are host numbers), exp_avg
    and exp_avg_sq (fp32, on the parameter's device); saved and restored by state_dict /
    load_state_dict. step() runs torch._foreach_* kernels over each group's tensors and reads
    nothing back to the host (norms and trust ratios stay on the device, the zero-norm cases are a
    torch.where), so it neither syncs a CUDA stream nor branches on tensor values. fp32
    parameters, CPU or CUDA.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, max_trust_ratio: float | None = None):
        if not lr >= 0.0:
            raise ValueError(f"Lamb: lr {lr} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lamb: betas {betas} must be in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"Lamb: eps {eps} must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"Lamb: weight_decay {weight_decay} must be >= 0")
        if max_trust_ratio is not None and not max_trust_ratio > 0.0:
            raise ValueError(f"Lamb: max_trust_ratio {max_trust_ratio} must be > 0 (or None)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      max_trust_ratio=max_trust_ratio))

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        for st in self.state.values():  # a step saved as a tensor reads back as the count it is
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = int(st["step"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # One foreach pass per (device, dtype, step count): the step count is a Python int
            # per parameter (the same for all of them unless some had no gradient at some step),
            # so the bias corrections are host numbers and no per-tensor scalar op is needed.
            buckets: dict[tuple, tuple[list, ...]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                if p.dtype != torch.float32:
                    raise RuntimeError(f"Lamb: fp32 parameters only, got {p.dtype} (keep fp32 master "
                                       "weights: torch_autocast, not DeepSpeed's bf16/fp16 modes)")
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                lists = buckets.setdefault((p.device, p.dtype, st["step"]), ([], [], [], []))
                for lst, t in zip(lists, (p, p.grad, st["exp_avg"], st["exp_avg_sq"])):
                    lst.append(t)
            for (_, _, step), (params, grads, exp_avgs, exp_avg_sqs) in buckets.items():
                _lamb_update(params, grads, exp_avgs, exp_avg_sqs, step, lr=group["lr"],
                             beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                             weight_decay=group["weight_decay"],
                             max_trust_ratio=group.get("max_trust_ratio"))
        return loss


def _lamb_update(params, grads, exp_avgs, exp_avg_sqs, step: int, *, lr, beta1, beta2, eps,
                 weight_decay, max_trust_ratio) -> None:
    """One LAMB step over tensors of one device, dtype and step count; no host read. Kernels:
    a few multi-tensor ones for the whole list, plus one per tensor to apply its trust ratio."""
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    # Moments.
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    # r = m_hat / (sqrt(v_hat) + eps) + wd x  with  m_hat = m / bc1, sqrt(v_hat) = sqrt(v) / bc2_sqrt,
    # i.e. r = m / (sqrt(v) * bc1 / bc2_sqrt + eps * bc1) + wd x.
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_mul_(denom, bc1 / bc2_sqrt)
    torch._foreach_add_(denom, eps * bc1)
    update = torch._foreach_div(exp_avgs, denom)
    del denom
    if weight_decay != 0.0:
        torch._foreach_add_(update, params, alpha=weight_decay)
    # Trust ratio per tensor: ||x|| / ||r||, 1 where either norm is 0 (on the device, no branch).
    w_norm = torch.stack(torch._foreach_norm(params))
    u_norm = torch.stack(torch._foreach_norm(update))
    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
    if max_trust_ratio is not None:
        ratio = ratio.clamp(max=max_trust_ratio)
    # x += r * (-lr * ratio): one addcmul per tensor with its own 0-dim scale (lr: float or tensor)
    torch._foreach_addcmul_(params, update, ratio.mul_(-lr).unbind(0))


def make_optimizer(model, ds_cfg: dict, device, config_name: str | None = None,
                   gates_apart: bool = False) -> torch.optim.Optimizer:
    """The client optimizer for deepspeed.initialize(model=..., optimizer=...) from the config's
    `optimizer` block (type + params), which is removed from ds_cfg so that DeepSpeed uses this
    optimizer instead of building one. Without a block: AdamW with the defaults below.

    Groups come from model.param_groups(weight_decay, gates_apart): params.weight_decay (default
    0.01) on the weights, 0 on biases, LayerNorm and EarlyBERT gates (with gates_apart, the gates
    in a group of their own marked "gates").
    - "AdamW": torch.optim.AdamW (fused on CUDA), defaults lr 1e-4, betas (0.9, 0.999), eps 1e-8.
    - "LAMB" / "Lamb": pipeline.optim.Lamb, defaults lr 1e-3, betas (0.9, 0.999), eps 1e-6,
      max_trust_ratio None. Needs the unflattened parameters: ZeRO stage 0, fp32 parameters
      (torch_autocast for bf16), see the module docstring.
    Any other type, or LAMB where DeepSpeed would not hand it the real parameters: ValueError
    whose message names the optimizer type (prefixed with "config_name: " when given).
    """
    where = f"{config_name}: " if config_name else ""
    opt = ds_cfg.get("optimizer", {"type": "AdamW", "params": {}})
    kind = str(opt.get("type", "AdamW"))
    params = dict(opt.get("params", {}))
    if kind.lower() == "adamw":
        groups = model.param_groups(params.pop("weight_decay", 0.01), gates_apart)
        kw = {"lr": params.get("lr", 1e-4), "betas": tuple(params.get("betas", (0.9, 0.999))),
              "eps": params.get("eps", 1e-8)}
        if torch.device(device).type == "cuda":
            kw["fused"] = True
        optimizer = torch.optim.AdamW(groups, **kw)
    elif kind.lower() == "lamb":
        unknown = set(params) - {"lr", "betas", "eps", "weight_decay", "max_trust_ratio"}
        if unknown:
            raise ValueError(f"{where}optimizer LAMB: unknown params {sorted(unknown)} "
                             "(supported: lr, betas, eps, weight_decay, max_trust_ratio)")
        zero = ds_cfg.get("zero_optimization", {}).get("stage", 0)
        if zero or ds_cfg.get("bf16", {}).get("enabled") or ds_cfg.get("fp16", {}).get("enabled"):
            raise ValueError(f"{where}optimizer LAMB needs ZeRO stage 0 and fp32 parameters "
                             "(bf16 through torch_autocast): ZeRO 1/2/3 hand the optimizer flat "
                             "partitions (one trust ratio per group, not per parameter) and "
                             "DeepSpeed's bf16/fp16 modes wrap it in their own optimizer "
                             f"(got ZeRO stage {zero}, "
                             f"bf16 {bool(ds_cfg.get('bf16', {}).get('enabled'))}, "
                             f"fp16 {bool(ds_cfg.get('fp16', {}).get('enabled'))})")
        groups = model.param_groups(params.pop("weight_decay", 0.01), gates_apart)
        optimizer = Lamb(groups, lr=params.get("lr", 1e-3), betas=tuple(params.get("betas", (0.9, 0.999))),
                         eps=params.get("eps", 1e-6), max_trust_ratio=params.get("max_trust_ratio"))
    else:
        raise ValueError(f"{where}optimizer type {kind!r} is not supported: one of "
                         f"{', '.join(SUPPORTED)} (built by the trainer as a client optimizer)")
    ds_cfg.pop("optimizer", None)
    return optimizer
