"""Batches of training sequences from the token files that data/data.py writes.

A split (`train.bin`, `val.bin`) is one long memory-mapped array of token ids, cut into
non-overlapping chunks of block_size + 1 tokens (input and its next-token target, stride block_size).
Each epoch draws from (seed, epoch) a shift of the chunk boundaries (0 .. block_size-1 tokens, so
the model does not see the same cuts every epoch, which makes it overfit faster) and a random order
of the chunks. Sequence number s of the run (counting over steps, micro-steps and ranks) is chunk
perm_epoch[s mod n_chunks], starting at token shift_epoch + chunk * block_size:

    micro-batch i of rank r  =  sequences  (i * world_size + r) * B  ...  (i * world_size + r + 1) * B - 1

So batches are a pure function of (seed, i, rank): resuming needs only the counter i, the ranks'
slices are disjoint, and together they cover every chunk of an epoch once, with no gaps.
"""

import json
import os

import numpy as np
import torch


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no prepared dataset at {data_dir}/ (meta.json missing); make it "
                                f"first: {prepare_command(data_dir)}")
    with open(path) as f:
        return json.load(f)


def prepare_command(data_dir):
    """The data/data.py command line that builds the dataset folder data_dir."""
    root, name = os.path.split(os.path.normpath(data_dir))
    source, _, kind = name.rpartition("_")
    if source in ("shakespeare", "tinystories") and kind in ("char", "byte", "gpt2", "bpe"):
        args = [source] if source != "shakespeare" else []
        args += [f"--tokenizer {kind}"] if kind != "char" else []
    else:
        args = [f"--input PATH_OR_GLOB --name {name}"]
    repo_data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    if os.path.abspath(root) != repo_data:
        args.append(f"--out-root {root}")
    return " ".join(["python data/data.py"] + args)


def open_split(data_dir, split):
    """The token ids of one split as a read-only memmap."""
    meta = load_meta(data_dir)
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; re-run data/data.py for this dataset")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


class Loader:
    def __init__(self, data, batch_size, block_size, seed=0, rank=0, world_size=1, device="cpu",
                 name="this"):
        """name: what to call the split in error messages ("train", "val")."""
        self.data, self.B, self.T = data, batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        whole = (len(data) - 1) // block_size  # chunks that fit with no shift
        self.n_chunks = whole - 1 if whole > 1 else whole  # keep one chunk of slack for the shift
        self.max_shift = min(block_size - 1, len(data) - 1 - self.n_chunks * block_size)
        if self.n_chunks < 1:
            raise ValueError(f"the {name} split has {len(data)} tokens, too few for block_size {block_size} "
                             f"(one sequence needs {block_size + 1}); lower --block_size or add data")
        self.index = 0  # the next micro-batch to hand out
        self._perms = {}

    def _epoch(self, epoch):
        """(shift, order of the chunks) of an epoch."""
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, epoch])
            self._perms = {epoch: (int(rng.integers(self.max_shift + 1)), rng.permutation(self.n_chunks))}
        return self._perms[epoch]

    def get(self, i):
        """Micro-batch i of this rank: x, y of shape (B, T), int64, on the loader's device."""
        first = (i * self.world_size + self.rank) * self.B
        rows = []
        for s in range(first, first + self.B):
            shift, perm = self._epoch(s // self.n_chunks)
            start = shift + perm[s % self.n_chunks] * self.T
            rows.append(self.data[start: start + self.T + 1])
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)
        x, y = batch[:, :-1], batch[:, 1:]
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        else:
            x, y = x.contiguous().to(self.device), y.contiguous().to(self.device)
        return x, y

    def next(self):
        batch = self.get(self.index)
        self.index += 1
        return batch

    def state_dict(self):
        return {"index": self.index, "seed": self.seed}

    def load_state_dict(self, state):
        if state["seed"] != self.seed:
            raise ValueError(f"loader seed {self.seed} differs from the checkpoint's {state['seed']}")
        self.index = state["index"]


# ------------------------------------------------------------------------------------------------
# The notebooks' text

def notebook_text():
    """The tiny-shakespeare text the notebooks (nb/*.ipynb) learn from, read by data/data.py's
    read_text: the file named by the environment variable GPT_NB_TEXT when it is set (the test
    suite writes a small text and names it there), otherwise data/raw/tinyshakespeare.txt, which
    `python data/data.py` downloads."""
    from data.data import read_text  # data/data.py, the one reader of raw text

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("GPT_NB_TEXT") or os.path.join(root, "data", "raw", "tinyshakespeare.txt")
    if not os.path.exists(path):
        if os.environ.get("GPT_NB_TEXT"):
            raise FileNotFoundError(f"GPT_NB_TEXT names {path}, which does not exist")
        raise FileNotFoundError(
            f"no text for the notebooks at {path}. Download tiny shakespeare first:\n"
            f"    python data/data.py\n"
            f"or point the environment variable GPT_NB_TEXT at any UTF-8 text file.")
    return read_text(path)
