"""Optimizers and learning-rate schedules.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv 1711.05101) with two
parameter groups: matrices (dim >= 2: Linear weights, embeddings) decay, vectors (norm gains,
biases) do not. Fused kernels on CUDA.

Muon (Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024; Liu et al.,
"Muon is Scalable for LLM Training", arXiv 2502.16982) for the 2-D weights of the hidden layers: it
keeps a momentum of the gradient and steps along its nearest semi-orthogonal matrix, found by a
Newton–Schulz iteration instead of an SVD:

    B_t = mu B_{t-1} + (1 - mu) g_t;   U_t = (1 - mu) g_t + mu B_t      (Nesterov)
    X_0 = U_t / ||U_t||_F;   X_{k+1} = a X_k + (b A_k + c A_k^2) X_k,  A_k = X_k X_k^T   (5 times, bf16 on a GPU)
    W <- W (1 - lr wd) - lr sqrt(max(1, rows / cols)) X_5

    (a, b, c) = (3.4445, -4.7750, 2.0315): X_5 ~ U S' V^T with S' in about [0.7, 1.2], not exactly
    U V^T, which trains as well and needs fewer steps.

Everything else (embeddings, the output head, norm gains, biases, tensors that are not matrices)
stays on AdamW. `optimizer = "muon"` builds both and steps them as one (`Optimizers`). The Muon
here is torch.optim.Muon (the reference; same state, so checkpoints interchange) with one change
of speed only: matrices of the same shape go through Newton–Schulz together, as one batch of
matmuls, instead of one small matmul chain each (a 6-layer model has 24 matrices but 4 shapes).

Schedules, for step t of a schedule of lr_decay_iters steps (0: max_iters) with warmup w:
    cosine  lr = lr_max * t/w during warmup, then min_lr + (lr_max - min_lr) * (1 + cos(pi * p)) / 2
    wsd     warmup, then lr_max (stable) until the last decay_frac of the run, then linear to min_lr
            (Hu et al., MiniCPM, arXiv 2404.06395)
Every group follows the same curve, scaled by its `lr_scale` (the Muon groups: muon_lr / lr).
Config: optimizer, lr, min_lr, weight_decay, beta1, beta2, muon_lr, muon_momentum,
muon_weight_decay, schedule, warmup_iters, decay_frac.
"""

import math
from collections import defaultdict

import torch
from torch import nn

# --------------------------------------------------------------------------------------------------
# Which parameter goes where


def muon_params(model):
    """The matrices Muon steps: weights of the nn.Linear layers inside model.blocks (not the
    embeddings or the head, even when tied). A layer keeps one of its matrices on AdamW by setting
    `weight.muon = False` (a router, say)."""
    found = {}
    for m in model.blocks.modules():
        if isinstance(m, nn.Linear) and m.weight.dim() == 2 and m.weight.requires_grad \
                and getattr(m.weight, "muon", True):
            found[id(m.weight)] = m.weight
    outside = {id(p) for name, p in model.named_parameters() if not name.startswith("blocks.")}
    return [p for i, p in found.items() if i not in outside]  # a weight tied to the head stays out


def param_groups(model, weight_decay, exclude=()):
    """AdamW's two groups over the trainable parameters not in `exclude`."""
    skip = {id(p) for p in exclude}
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad and id(p) not in skip:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, tc, device_type):
    """The optimizer named by tc.optimizer (a TrainConfig): AdamW, or Muon + AdamW as one."""
    fused = device_type == "cuda"
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr,
                                 betas=(tc.beta1, tc.beta2), fused=fused)
    matrices = muon_params(model)
    muon = Muon([{"params": matrices, "lr_scale": tc.muon_lr / tc.lr}], lr=tc.muon_lr,
                momentum=tc.muon_momentum, weight_decay=tc.muon_weight_decay)
    adamw = torch.optim.AdamW(param_groups(model, tc.weight_decay, exclude=matrices), lr=tc.lr,
                              betas=(tc.beta1, tc.beta2), fused=fused)
    return Optimizers(muon, adamw)


class Optimizers:
    """Several optimizers over disjoint parameters, used as one: step, zero_grad, param_groups
    (for the schedule), state_dict / load_state_dict (for checkpoints)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        saved = state.get("optimizers")
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state is for another optimizer; "
                             "resume with the run's own --optimizer")
        for opt, s in zip(self.optimizers, saved):
            opt.load_state_dict(s)


# --------------------------------------------------------------------------------------------------
# Muon


def zeropower_via_newtonschulz(G, coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7):
    """Approximately orthogonalise each matrix of G (..., m, n): the quintic Newton–Schulz
    iteration of torch.optim.Muon, batched over the leading dims; in bf16 on a GPU, as torch's, and
    in fp32 on a CPU, where bf16 matmuls have no hardware path (30-40x slower there: a 33 s step
    for the baby GPT on this project's CPU)."""
    a, b, c = coefficients
    shape = G.shape
    X = G.reshape(-1, *shape[-2:]).to(torch.bfloat16 if G.is_cuda else torch.float32)  # (G, m, n)
    tall = shape[-2] > shape[-1]
    if tall:
        X = X.mT  # (G, n, m): iterate on the smaller Gram matrix
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT  # (G, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    if tall:
        X = X.mT
    return X.reshape(shape)


def muon_lr_scale(shape, adjust_lr_fn=None):
    """torch.optim.Muon's per-matrix lr factor: sqrt(max(1, rows/cols)) ("original", Keller Jordan),
    or 0.2 sqrt(max(rows, cols)) ("match_rms_adamw", Moonshot) so AdamW's lr carries over."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class Muon(torch.optim.Muon):
    """torch.optim.Muon with one batched Newton–Schulz per shape of matrix (same update, same state).

    Like fused AdamW it skips a step on the device: set `found_inf` (a 0-d float tensor, 1 = the
    gradients are not finite) before step() and a bad step leaves weights and momentum exactly as
    they were, without the host reading the verdict (train.py's step_if_finite). The learning rate
    may be a 0-d tensor on the device, as in a captured CUDA graph (model.graph_step)."""

    found_inf = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        keep = None if self.found_inf is None else 1 - self.found_inf  # 0-d: 1 = step, 0 = skip
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            grads = [p.grad for p in params]
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            if keep is not None:  # a skipped step: g = 0 and every change below multiplied by 0
                grads = [torch.where(keep > 0, g, 0) for g in grads]  # (a non-finite g would poison B)
                delta = torch._foreach_sub(grads, bufs)
                torch._foreach_mul_(delta, (1 - mu) * keep)
                torch._foreach_add_(bufs, delta)  # B = B + (1 - mu) (g - B), or B
            else:
                torch._foreach_lerp_(bufs, grads, 1 - mu)  # B = mu B + (1 - mu) g
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd if keep is None else 1 - lr * wd * keep)
            same_shape = defaultdict(list)
            for p, u in zip(params, updates):
                same_shape[tuple(p.shape)].append((p, u))
            for shape, pairs in same_shape.items():
                ps = [p for p, _ in pairs]
                O = zeropower_via_newtonschulz(torch.stack([u for _, u in pairs]),  # (G, m, n)
                                               group["ns_coefficients"], group["ns_steps"], group["eps"])
                step = -lr * muon_lr_scale(shape, group["adjust_lr_fn"])  # lr: a float, or a tensor in a CUDA graph
                O = O.to(ps[0].dtype) * (step if keep is None else step * keep)
                torch._foreach_add_(ps, list(O.unbind(0)))
        return loss


# --------------------------------------------------------------------------------------------------
# Learning-rate schedules


def lr_at(step, tc):
    """Learning rate for optimizer step `step` (0-based) under tc's schedule."""
    total = tc.lr_decay_iters or tc.max_iters  # the schedule's length, not where this run stops
    if step < tc.warmup_iters:
        return tc.lr * (step + 1) / tc.warmup_iters
    if tc.schedule == "wsd":
        decay_start = int(total * (1 - tc.decay_frac))
        if step < decay_start:
            return tc.lr
        frac = (step - decay_start) / max(1, total - decay_start)
        return tc.lr + min(frac, 1.0) * (tc.min_lr - tc.lr)
    progress = min(1.0, (step - tc.warmup_iters) / max(1, total - tc.warmup_iters))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
