"""Checkpoints: written atomically, loaded safely, the last K kept.

Save: torch.save to `ckpt.pt.tmp` in the same folder, flush and fsync, then os.replace onto
`ckpt.pt`. A rename within one file system is atomic, so a process killed at any moment of a save
leaves either the old checkpoint or the new one, never half of one (at worst a stray `*.tmp`).

Keeping the last K (`train.py --keep_checkpoints K`): with K > 1 each save goes (atomically, as
above) to `ckpt-<step>.pt`, `ckpt.pt` is then swapped for a hard link to it (no extra disk; a copy
where the file system has no hard links), and the numbered files beyond the newest K are deleted.
`ckpt.pt` is always the newest; resume from an older one with `train.py --resume out/run/ckpt-<step>.pt`.

Load: torch.load(weights_only=True), which unpickles only tensors and plain containers, so a
checkpoint someone sent you cannot run code. Everything else in it (config, tokenizer, loader
state, RNG states) is stored as plain data: dicts, lists, strings, numbers, tensors.
"""

import dataclasses
import os
import pickle
import re
import shutil

import torch

from gpt.config import GPTConfig


def _atomic_write(path, write):
    """write(f) into a temp file beside path, flushed to disk, then renamed onto path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path, text):
    """Atomically replace the text file at path (config.json, a rewritten log.jsonl)."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def numbered(path, step):
    """out/run/ckpt.pt, 1200 -> out/run/ckpt-0001200.pt"""
    stem, ext = os.path.splitext(path)
    return f"{stem}-{step:07d}{ext}"


def save(path, state, keep=1):
    """Atomically write `state` (a dict of tensors and plain data) to path; with keep > 1 also keep
    it as numbered(path, state["step"]) and delete the numbered ones beyond the newest `keep`."""
    if keep <= 1:
        _atomic_write(path, lambda f: torch.save(state, f))
        return
    step = state["step"]
    _atomic_write(numbered(path, step), lambda f: torch.save(state, f))
    tmp = path + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(numbered(path, step), tmp)
    except OSError:  # no hard links here (some network or FAT file systems): a copy instead
        shutil.copyfile(numbered(path, step), tmp)
    os.replace(tmp, path)
    # Numbered checkpoints of later steps belong to a run resumed from an older one: left alone.
    stem, ext = os.path.splitext(os.path.basename(path))
    pattern = re.compile(re.escape(stem) + r"-(\d+)" + re.escape(ext) + "$")
    folder = os.path.dirname(os.path.abspath(path))
    steps = sorted((int(m.group(1)) for m in map(pattern.match, os.listdir(folder)) if m), reverse=True)
    for old in [s for s in steps if s <= step][keep:]:
        os.remove(numbered(path, old))


def load(path, map_location="cpu"):
    """The dict saved at path, loaded with weights_only=True. Fails with a one-line message when the
    file is missing, damaged, or holds anything but tensors and plain data."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train one first, e.g. `python train.py` "
                                f"(it writes out/<run>/ckpt.pt), or pass --out_dir of an existing run")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise ValueError(f"refusing to load {path}: it holds more than tensors and plain data ({why}), "
                         f"or is damaged. Checkpoints load with weights_only=True so that no code in "
                         f"them runs") from None
    except Exception as e:  # a truncated zip (RuntimeError), an empty file (EOFError), junk (KeyError)
        raise ValueError(f"{path} is damaged or not a checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


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
    saved = dataclasses.asdict(model_config(ckpt))  # fields added to the code since: their defaults
    current = dataclasses.asdict(config)
    diff = [f"{k} (checkpoint {saved[k]!r}, now {current[k]!r})"
            for k in sorted(saved) if saved[k] != current[k]]
    if diff:
        raise ValueError(f"the checkpoint's model does not match this config: {', '.join(diff)}; "
                         f"a resumed run keeps its model, so drop those overrides")
