"""The decoding loop: sample one token at a time, with per-layer caches, temperature, top-k, top-p.

    p = softmax(logits / temperature)         temperature 0 means greedy (argmax)
    top-k: keep the k most likely tokens; top-p (nucleus, Holtzman et al., arXiv 1904.09751): keep the
    smallest set whose probability sums to >= p; renormalise and sample.

With `use_cache` the prompt is run once (prefill) and then each new token is a forward of length 1
against the layers' caches. Once the sequence fills the context, the window slides: the model sees
the last block_size tokens from position 0 again, exactly as the uncached loop does, so both give the
same tokens at temperature 0.

A decode step of a small model does little arithmetic, and eagerly its time goes to launching its
many small kernels one by one; `compile=True` runs the decode steps through torch.compile (shapes
dynamic as the cache grows; it compiles during the first steps, and once more when a cache fills),
which fuses them (bench.py --decode-compile).
"""

import torch

from gpt.attention import decoding_kernels


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits: (B, V) -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)  # (B, V)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # tokens after the nucleus is full
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             use_cache=True, generator=None, on_token=None, vocab_size=None, compile=False):
    """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

    vocab_size: the tokenizer's; ids at or above it (padding of the model's vocabulary) are never
    sampled.
    on_token(next_ids) is called with each new (B, 1) tensor as soon as it is sampled (streaming).
    compile: the cached decode steps through torch.compile (see above).
    """
    block_size = model.config.block_size
    step = torch.compile(model) if compile and use_cache else model
    cache = None
    with decoding_kernels():  # a new attention shape every token (attention.py)
        for _ in range(max_new_tokens):
            window = idx[:, -block_size:]
            if not use_cache:
                logits, _ = model(window)
            elif cache is None or cache.seen >= block_size:
                # (re)fill the cache from the current window, starting again at position 0
                cache = model.new_cache(idx.size(0), block_size)
                logits, _ = model(window, cache=cache)
            else:
                logits, _ = step(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :vocab_size]  # (B, V)
            next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
            if on_token is not None:
                on_token(next_id)
    return idx
