"""Checkpoints: written atomically, loaded safely.

Save: torch.save to `ckpt.pt.tmp` in the same folder, flush and fsync, then os.replace onto
`ckpt.pt`. A rename within one file system is atomic, so a crash at any moment leaves either the
old checkpoint or the new one, never half of one.

Load: torch.load(weights_only=True), which unpickles only tensors and plain containers, so a
checkpoint someone sent you cannot run code. Everything else in it (config, tokenizer, loader
state, RNG states) is stored as plain data: dicts, lists, strings, numbers, tensors.
"""

import dataclasses
import os

import torch

from gpt.config import GPTConfig


def save(path, state):
    """Atomically write `state` (a dict of tensors and plain data) to path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path, map_location="cpu"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train one first, e.g. `python train.py` "
                                f"(it writes out/<run>/ckpt.pt), or pass --out_dir of an existing run")
    return torch.load(path, map_location=map_location, weights_only=True)


def model_config(ckpt):
    """The GPTConfig stored in a checkpoint."""
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(ckpt["model_config"]) - known)
    if unknown:
        raise ValueError(f"checkpoint has config fields this code does not know: {unknown}; "
                         f"it was written by a newer or different version of gpt/")
    return GPTConfig(**ckpt["model_config"])


def check_compatible(ckpt, config):
    """Fail, naming the fields, when the checkpoint's model config differs from `config`."""
    saved = ckpt["model_config"]
    current = dataclasses.asdict(config)
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError("checkpoint does not match the model config:\n  " + "\n  ".join(diff))


def unwrap(model):
    """The plain nn.Module under torch.compile / DDP wrappers, whose state_dict keys are clean."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)
