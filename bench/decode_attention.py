"""One decoding step's attention at batch 32, context 8192, the GPT-2-124M width, on a GPU: MHA
(12 heads of 64, keys and values cached per head) against MLA's absorbed step (one wide head: the
cached rows [c_kv ; k^R] of r + d_r = 256 + 32 numbers, values their first 256), kernel by kernel.
Mean of 50 calls between CUDA events, microseconds per layer; bytes are what the cache holds.

    python bench/decode_attention.py
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, S, nh, hs, r, dr = 32, 8192, 12, 64, 256, 32


def timed(f, n=50):
    for _ in range(3):
        f()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        f()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3  # microseconds


def main():
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    # caches as generation holds them: views of a longer preallocated buffer
    k = torch.randn(B, nh, S + 64, hs, device=dev, dtype=dt)[:, :, :S]  # (B, nh, S, hs)
    v = torch.randn(B, nh, S + 64, hs, device=dev, dtype=dt)[:, :, :S]
    q = torch.randn(B, nh, 1, hs, device=dev, dtype=dt)  # (B, nh, 1, hs): one new token
    mask = torch.ones(1, S, dtype=torch.bool, device=dev)
    rows = torch.randn(B, 1, S + 64, r + dr, device=dev, dtype=dt)[:, :, :S]  # (B, 1, S, r + dr)
    q_rows = torch.randn(B, 1, nh, r + dr, device=dev, dtype=dt)  # (B, 1, nh, r + dr): heads as rows
    scale = 1 / (hs + dr) ** 0.5

    def mla_bmm():
        s = (q_rows.squeeze(1) @ rows.squeeze(1).mT) * scale  # (B, nh, S)
        p = s.softmax(-1, dtype=torch.float32).to(dt)
        return p @ rows.squeeze(1)[..., :r]  # (B, nh, r)

    mha_bytes, mla_bytes = 2 * k.numel() * 2, rows.numel() * 2
    results = []
    decoding = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(decoding):
        results.append(("MHA, SDPA with a (1, S) mask", timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), mha_bytes))
        results.append(("MHA, SDPA without a mask", timed(lambda: F.scaled_dot_product_attention(q, k, v)), mha_bytes))
        results.append(("MLA, one SDPA call", timed(lambda: F.scaled_dot_product_attention(q_rows, rows, rows[..., :r], scale=scale)), mla_bytes))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        results.append(("MHA, cuDNN without a mask", timed(lambda: F.scaled_dot_product_attention(q, k, v)), mha_bytes))
    results.append(("MLA, two bmm", timed(mla_bmm), mla_bytes))
    results.append(("MLA, two bmm, compiled", timed(torch.compile(mla_bmm)), mla_bytes))
    for name, us, nbytes in results:
        print(f"{name:32s} {us:8.1f} us   cache {nbytes / 1e6:6.0f} MB, read once at {nbytes / us / 1e6:.2f} TB/s")


if __name__ == "__main__":
    main()
