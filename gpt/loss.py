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

Between the chunk's two matmuls sits the elementwise middle, `_ce_rows`: per row the loss term
lse - z_y and the gradient softmax(z) - onehot(y), both zero for ignored rows. Its reference is
plain PyTorch in fp32 (CPU, fp64, no Triton). On CUDA with Triton, and GPT_TRITON=1 in the
environment (opt-in until its speed is measured: see the end), it is one kernel, `_ce_kernel`:
one program per row, blocks of CE_BLOCK columns; pass 1 reads the row for an online logsumexp
(running max m and sum s of exp(z - m), rescaled as m grows), pass 2 reads it again and writes the
gradient over the logits, in the matmul's dtype. Bytes through memory per logit of a bf16 chunk:

    reference, eager:  upcast 2+4, logsumexp 4 (amax) + 4+4 (z - max) + 4+4 (exp) + 4 (sum),
                       softmax 4+4 (z - lse) + 4+4 (exp), mask 4+4, cast to bf16 4+2     = 60 B
    kernel:            read 2 (pass 1) + read 2 and write 2 (pass 2)                      =  6 B

so a chunk of 2^27 logits moves 8.05 GB before and 0.81 GB after: about 2.4 ms against 0.24 ms at
the H100's 3.35 TB/s, and for the GPT-2 bench row's 12288 x 50304 logits a step about 11 ms
against 1.1 ms. The bench row (gpt2-fused-ce) is compiled, and Inductor already fuses much of the
reference's chain into a few passes, so the gain there is smaller; it is to be measured. Under
torch.compile Dynamo takes the kernel as a user-defined Triton kernel. The kernel is checked
against the reference under Triton's CPU interpreter (fp32) and built for the H100 (sm_90a,
CE_BLOCK 4096 with 8 warps: 40 registers a thread, no spills, 16-byte loads and stores) by
tests/test_loss.py. On an H100 (2026-12-07) it equals the reference path in bf16 and fp32 at
GPT-2's shape, and a compiled bf16 model through it equals the full loss (tests/test_loss.py's GPU
tests); its speed is NOT yet measured.
"""

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch reference serves
    triton = None

CHUNK_ELEMENTS = 2 ** 27  # logits per chunk (128M: 256 MB in bf16): GPT-2's vocabulary in 2668-row chunks
CE_BLOCK, CE_WARPS = 4096, 8  # _ce_kernel's columns per block and warps per row: 16 logits a thread
# Triton's CPU interpreter (TRITON_INTERPRET=1, read when triton is imported) runs the kernel on CPU tensors
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The Triton kernel serves CUDA tensors only when TRITON is set (environment: GPT_TRITON=1). On the
# H100 it equals the reference (tests/test_loss.py, 2026-12-07, compiled model included), but its
# speed against the compiled PyTorch middle is not measured yet, so that path stays the default.
TRITON = os.environ.get("GPT_TRITON") == "1"


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


# ----------------------------------------------------------------------------------------------
# The elementwise middle of a chunk: loss terms and gradient from the logits

def _ce_rows_reference(z, targets, grad):
    """Per-row loss terms lse - z_y (n,) in fp32 (fp64 for fp64 z) and, with grad, the gradient
    softmax(z) - onehot(y) (n, V) in z's dtype; both zero where the target is -1."""
    zf = z.to(torch.promote_types(z.dtype, torch.float32))  # (n, V) bf16 -> fp32; fp64 stays
    valid = targets != -1  # (n,)
    safe = targets.clamp(min=0)[:, None]  # (n, 1) ignored rows index class 0, then drop out through `valid`
    lse = torch.logsumexp(zf, dim=-1)  # (n,)
    loss = (lse - zf.gather(1, safe).squeeze(1)) * valid  # (n,)
    if not grad:
        return loss, None
    g = torch.exp(zf - lse[:, None])  # (n, V) softmax
    g.scatter_add_(1, safe, -torch.ones_like(lse)[:, None])  # - onehot(y)
    return loss, (g * valid[:, None]).to(z.dtype)  # (n, V)


if triton is not None:
    @triton.jit
    def _ce_kernel(z_ptr, targets_ptr, loss_ptr, stride, V: tl.constexpr, BLOCK: tl.constexpr,
                   GRAD: tl.constexpr):
        """One program per row of the logits z (n, V): loss_ptr[row] = lse - z_y, and with GRAD the
        row overwritten by softmax(z) - onehot(y) in z's dtype; both zero where y = -1. V is a
        constant (one build per vocabulary): the loops' bounds and the last block's mask are known."""
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride
        y = tl.load(targets_ptr + row)
        # z_y is read first: pass 1's reductions synchronise the program's warps before any of them
        # overwrites the row in pass 2
        z_y = tl.load(z_row + tl.maximum(y, 0)).to(tl.float32)
        cols = tl.arange(0, BLOCK)  # (BLOCK,)
        m = tl.full([], float("-inf"), tl.float32)  # running max of the row
        s = tl.zeros([], tl.float32)  # running sum of exp(z - m)
        for start in range(0, V, BLOCK):  # pass 1: online logsumexp
            zb = tl.load(z_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(zb, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zb - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        valid = y != -1
        tl.store(loss_ptr + row, tl.where(valid, lse - z_y, 0.0))
        if GRAD:
            for start in range(0, V, BLOCK):  # pass 2: the gradient, over the logits
                mask = start + cols < V
                zb = tl.load(z_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(zb - lse) - tl.where(start + cols == y, 1.0, 0.0)  # (BLOCK,)
                tl.store(z_row + start + cols, tl.where(valid, g, 0.0).to(z_ptr.dtype.element_ty), mask=mask)


def _ce_rows_triton(z, targets, grad):
    """_ce_rows_reference as one kernel; the gradient is written over z (z's memory is returned)."""
    n, V = z.shape
    loss = torch.empty(n, device=z.device, dtype=torch.float32)  # (n,)
    _ce_kernel[(n,)](z, targets, loss, z.stride(0), V=V, BLOCK=CE_BLOCK, GRAD=grad, num_warps=CE_WARPS)
    return loss, (z if grad else None)


def _kernel_applies(z):
    """The kernel serves CUDA logits (CPU ones under the interpreter) in fp32, bf16 or fp16."""
    return (triton is not None and ((TRITON and z.is_cuda) or _INTERPRET) and z.stride(-1) == 1
            and z.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _ce_rows(z, targets, grad):
    """Loss terms (n,) and, with grad, the gradient rows (n, V) of logits z (n, V): kernel or reference."""
    return (_ce_rows_triton if _kernel_applies(z) else _ce_rows_reference)(z, targets, grad)


# ----------------------------------------------------------------------------------------------
# The chunk loops: with gradients (training) and without (evaluation)

class LinearCrossEntropy(torch.autograd.Function):
    """mean CE of (x W^T) against targets; the gradients are made in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, x, weight, targets):
        # x: (N, C), weight: (V, C), targets: (N,)
        dtype = _compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        grad_x = torch.empty_like(x)  # (N, C)
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 in the tests
        grad_w = torch.zeros_like(weight, dtype=acc)  # (V, C), summed over the chunks
        loss = torch.zeros((), device=x.device, dtype=acc)
        for s, e in _chunks(x.size(0), weight.size(0)):
            z = xc[s:e] @ wc.T  # (n, V) logits of this chunk, in the matmul dtype
            rows, g = _ce_rows(z, targets[s:e], grad=True)  # (n,), (n, V); 1/n applied below
            loss = loss + rows.sum()
            grad_x[s:e] = g @ wc  # (n, C)
            grad_w += g.T @ xc[s:e]  # (V, C)
        scale = 1.0 / (targets != -1).sum().to(acc)  # nan loss when every target is ignored, as F.cross_entropy
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
        z = xc[s:e] @ wc.T  # (n, V)
        total = total + _ce_rows(z, targets[s:e], grad=False)[0].sum()
    return total / (targets != -1).sum()


def linear_cross_entropy(x, weight, targets):
    """Mean cross-entropy of logits x W^T without holding them: x (..., C), weight (V, C), targets
    (...) with -1 ignored. Equal to cross_entropy(x @ weight.T, targets)."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets)
    return _chunked_loss(x, weight, targets)
