"""Cross-entropy of the output head, plain or fused with the head so the logits are never held whole.

The loss of next-token prediction over N = B*T positions, vocabulary V, head W (V, C):

    z_i = W h_i                         logits of position i            (V,)
    loss = (1/n) sum_i [ logsumexp(z_i) - z_i[y_i] ]      over the n positions whose target y_i != -1
    dloss/dz_i = (softmax(z_i) - onehot(y_i)) / n,   dloss/dh_i = W^T dz_i,   dloss/dW = sum_i dz_i h_i^T

`cross_entropy` is the reference: it takes the (N, V) logits and upcasts them to fp32, as nanoGPT
does. At GPT-2 size and batch 12 that is 12288 x 50304 logits: 1.2 GB in bf16 and 2.5 GB more for
each fp32 copy (the upcast, the log-softmax autograd keeps, its gradient).

`linear_cross_entropy` (config.loss = "fused") takes h and W instead and walks the positions in
chunks. For each chunk it computes the logits, their logsumexp in fp32, the loss, and at once the
chunk's gradient, which it turns into its share of dloss/dh and dloss/dW before moving on (the idea
of Liger Kernel's fused linear cross-entropy, Hsu et al., arXiv 2410.10989). Only one chunk of
logits ever exists; backward just scales the stored gradients by the incoming one. Without grad
(evaluation) the chunks compute the loss alone.
"""

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2 ** 27  # logits per chunk (128M: 256 MB in bf16): GPT-2's vocabulary in 2668-row chunks


def cross_entropy(logits, targets):
    """Reference: mean cross-entropy of logits (..., V) against targets (...), -1 ignored, in fp32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def _chunks(n, vocab):
    rows = max(1, CHUNK_ELEMENTS // vocab)
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]


def _compute_dtype(x):
    """The dtype the head's matmul runs in: autocast's if it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """mean CE of (x W^T) against targets; the gradients are made in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, x, weight, targets):
        # x: (N, C), weight: (V, C), targets: (N,)
        dtype = _compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        valid = targets != -1  # (N,)
        n_valid = valid.sum()
        safe = targets.clamp(min=0)  # ignored rows index class 0, then drop out through `valid`
        grad_x = torch.empty_like(x)  # (N, C)
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 in the tests
        grad_w = torch.zeros_like(weight, dtype=acc)  # (V, C), summed over the chunks
        loss = torch.zeros((), device=x.device, dtype=acc)
        for s, e in _chunks(x.size(0), weight.size(0)):
            z = (xc[s:e] @ wc.T).to(acc)  # (n, V) logits of this chunk, fp32
            lse = torch.logsumexp(z, dim=-1)  # (n,)
            z_y = z.gather(1, safe[s:e, None]).squeeze(1)  # (n,) logit of the target
            loss = loss + ((lse - z_y) * valid[s:e]).sum()
            g = torch.exp(z - lse[:, None])  # (n, V) softmax
            g.scatter_add_(1, safe[s:e, None], -torch.ones_like(z_y)[:, None])  # - onehot(y)
            g = (g * valid[s:e, None]).to(dtype)  # (n, V), ignored rows zero; 1/n applied below
            grad_x[s:e] = g @ wc  # (n, C)
            grad_w += g.T @ xc[s:e]  # (V, C)
        scale = 1.0 / n_valid.to(acc)  # nan loss when every target is ignored, as F.cross_entropy gives
        ctx.save_for_backward(grad_x * scale.to(grad_x.dtype), (grad_w * scale).to(weight.dtype))
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss.to(grad_w.dtype), None


def _chunked_loss(x, weight, targets):
    """The fused loss without gradients (evaluation): the same chunks, no gradient work."""
    dtype = _compute_dtype(x)
    xc, wc = x.to(dtype), weight.to(dtype)
    acc = torch.promote_types(weight.dtype, torch.float32)
    total = torch.zeros((), device=x.device, dtype=acc)
    for s, e in _chunks(x.size(0), weight.size(0)):
        z = (xc[s:e] @ wc.T).to(acc)  # (n, V)
        total = total + F.cross_entropy(z, targets[s:e], ignore_index=-1, reduction="sum")
    return total / (targets != -1).sum()


def linear_cross_entropy(x, weight, targets):
    """Mean cross-entropy of logits x W^T without holding them: x (..., C), weight (V, C), targets
    (...) with -1 ignored. Equal to cross_entropy(x @ weight.T, targets)."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets)
    return _chunked_loss(x, weight, targets)
