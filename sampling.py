"""Sample text from a trained run.

    python sampling.py                                  # the newest run under out/
    python sampling.py --out_dir out/shakespeare-char --prompt "ROMEO:" --num-samples 3
    python sampling.py --temperature 0.8 --top-k 200 --top-p 0.95 --max-new-tokens 500 --seed 7
    python sampling.py --out_dir out/run/packed.pt      # a BitNet run packed by `python -m gpt.bitnet out/run`

Loads out_dir/ckpt.pt (weights only, no code runs), encodes the prompt with the run's own tokenizer
and streams tokens to the terminal as they are generated, using the layers' caches.
"""

import argparse
import glob
import os
import sys

import torch

from gpt import bitnet, checkpoint
from gpt import tokenizer as tok
from gpt.generate import generate
from gpt.model import GPT


def newest_run(root="out"):
    ckpts = glob.glob(os.path.join(root, "*", "ckpt.pt"))
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint under {root}/*/ckpt.pt; train one first: python train.py")
    return os.path.dirname(max(ckpts, key=os.path.getmtime))


def load_model(out_dir, device="cpu"):
    """(model in eval mode, tokenizer) of the run in out_dir (or of the checkpoint file out_dir)."""
    path = out_dir if out_dir.endswith(".pt") else os.path.join(out_dir, "ckpt.pt")
    ckpt = checkpoint.load(path, map_location=device)
    model = GPT(checkpoint.model_config(ckpt))
    if ckpt.get("bitnet_packed"):  # 2-bit ternary layers, run through the integer matmul (bitnet.py)
        bitnet.pack(model)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tok.from_meta(ckpt["tokenizer"])


def stream_printer(tokenizer):
    """An on_token callback that prints each new token's text as it comes. A byte-level tokenizer
    can split one character over several tokens: those are held back until the character is whole
    (at most 4), so no stray U+FFFD appears. Returns (on_token, flush)."""
    pending = []

    def flush():
        print(tokenizer.decode(pending), end="", flush=True)
        pending.clear()

    def on_token(next_id):  # (1, 1)
        pending.extend(next_id[0].tolist())
        if not tokenizer.decode(pending).endswith("\ufffd") or len(pending) >= 4:
            flush()
    return on_token, flush


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", "--out-dir", help="run folder with ckpt.pt, or a checkpoint file "
                   "(default: the newest run under out/)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context at every step")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile: faster steps after a compile of some seconds")
    a = p.parse_args(argv)
    if a.max_new_tokens < 1 or a.num_samples < 1:
        p.error("--max-new-tokens and --num-samples must be at least 1")
    if a.temperature < 0 or (a.top_p is not None and not 0 < a.top_p <= 1) or (a.top_k is not None and a.top_k < 1):
        p.error("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 1")
    try:
        out_dir = a.out_dir or newest_run()
        model, tokenizer = load_model(out_dir, a.device)
        ids = tokenizer.encode(a.prompt)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not ids:
        sys.exit("error: the prompt encodes to no tokens; give a non-empty --prompt")
    if a.max_new_tokens + len(ids) > model.config.block_size:
        print(f"(generating past the context of {model.config.block_size} tokens: the window slides)",
              file=sys.stderr)
    generator = torch.Generator(device=a.device).manual_seed(a.seed)
    for i in range(a.num_samples):
        print(f"--- sample {i + 1} ({out_dir}) ---")
        print(a.prompt, end="", flush=True)
        x = torch.tensor([ids], dtype=torch.long, device=a.device)
        on_token, flush = stream_printer(tokenizer)
        generate(model, x, a.max_new_tokens, a.temperature, a.top_k, a.top_p, use_cache=not a.no_cache,
                 generator=generator, vocab_size=tokenizer.vocab_size, on_token=on_token, compile=a.compile)
        flush()
        print()


if __name__ == "__main__":
    main()
