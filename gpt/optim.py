"""Optimizers and learning-rate schedules.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv 1711.05101) with two
parameter groups: matrices (dim >= 2: Linear weights, embeddings) decay, vectors (norm gains,
biases) do not. Fused kernels on CUDA.

Schedules, for step t of max_iters with warmup w:
    cosine  lr = lr_max * t/w during warmup, then min_lr + (lr_max - min_lr) * (1 + cos(pi * p)) / 2
    wsd     warmup, then lr_max (stable) until the last decay_frac of the run, then linear to min_lr
            (Hu et al., MiniCPM, arXiv 2404.06395)
Config: optimizer, lr, min_lr, weight_decay, beta1, beta2, schedule, warmup_iters, decay_frac.
"""

import math

import torch


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, tc, device_type):
    """The optimizer named by tc.optimizer (a TrainConfig)."""
    groups = param_groups(model, tc.weight_decay)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             fused=device_type == "cuda")


def lr_at(step, tc):
    """Learning rate for optimizer step `step` (0-based) under tc's schedule."""
    if step < tc.warmup_iters:
        return tc.lr * (step + 1) / tc.warmup_iters
    if tc.schedule == "wsd":
        decay_start = int(tc.max_iters * (1 - tc.decay_frac))
        if step < decay_start:
            return tc.lr
        frac = (step - decay_start) / max(1, tc.max_iters - decay_start)
        return tc.lr + min(frac, 1.0) * (tc.min_lr - tc.lr)
    progress = min(1.0, (step - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
