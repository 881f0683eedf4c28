"""Training on several GPUs or nodes with PyTorch's own engine: `torchrun` starts one process per
GPU, and train.py wraps the model in DDP or FSDP2, or trains with DiLoCo. Nothing here starts
processes itself.

    DDP     every rank holds the whole model and its own slice of each batch; after backward the
            gradients are averaged with one all-reduce (Li et al., "PyTorch Distributed:
            Experiences on Accelerating Data Parallel Training", arXiv 2006.15704).
    FSDP2   parameters, gradients and optimizer state are sharded over the ranks; each block's
            weights are all-gathered just before use and freed after (Zhao et al., "PyTorch FSDP",
            arXiv 2304.11277), so a model larger than one GPU's memory trains.
    DiLoCo  each worker takes H inner AdamW steps alone, then the workers average their
            "pseudo-gradients" and an outer Nesterov SGD moves the shared parameters
            (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
            Models", arXiv 2311.08105):
                Δ = mean_r (θ_outer - θ_r)            one all-reduce every H steps
                θ_outer <- NesterovSGD(θ_outer, grad=Δ, lr=outer_lr, momentum=outer_momentum)
                θ_r <- θ_outer                         every worker restarts from the new point
            With outer_lr = 1 and no momentum this is plain parameter averaging every H steps.
            Communication drops by a factor H against DDP (see bench.py --dist).
            Next step, not implemented: asynchronous DiLoCo (Liu et al., "Asynchronous Local-SGD
            Training for Language Modeling", arXiv 2401.09135), where workers of different speeds
            send their deltas when ready and the server applies them with delayed Nesterov
            momentum, so no worker waits for the slowest.

Gradient accumulation skips the all-reduce on all but the last micro-step (`grad_sync`); under
FSDP2 the gathered weights also stay between those micro-steps. In bf16, FSDP2 gathers the blocks'
weights in bf16 and reduces gradients in fp32 (a MixedPrecisionPolicy, as torchtitan does). Only
rank 0 logs, plots and writes checkpoints; checkpoints always hold full (unsharded) fp32 tensors,
so a run saved under FSDP loads in a single process and the reverse.
Config: parallel ("ddp" | "fsdp" | "diloco"), diloco_inner_steps, diloco_outer_lr,
diloco_outer_momentum.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

# FSDP2 and the state-dict helpers are imported where they are used: together they take ~0.8 s to
# import (DTensor), which a one-GPU run should not wait for before its first step.


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def setup(device):
    """Join the process group when launched by torchrun (RANK is set); else a single process.
    Returns (Dist, device), the device being this rank's GPU under CUDA."""
    if "RANK" not in os.environ:
        return Dist(), device
    use_cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    d = Dist(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
        device = f"cuda:{d.local_rank}"
    return d, device


def teardown(d):
    if d.enabled:
        dist.destroy_process_group()


def wrap(model, parallel, d, device_type, param_dtype=None):
    """DDP or FSDP2 around the model (the model itself for one process or DiLoCo). param_dtype:
    the dtype FSDP2 gathers the blocks' weights in (torch.bfloat16 under bf16 autocast on CUDA;
    None: the weights' own, fp32)."""
    if not d.enabled or parallel == "diloco":
        return model
    if parallel == "ddp":
        # the gradients are views into the all-reduce buckets: no copy between the two
        return DDP(model, device_ids=[d.local_rank] if device_type == "cuda" else None,
                   gradient_as_bucket_view=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device_type, (d.world_size,))
    # With param_dtype=bf16 each block is gathered in bf16 (half the bytes of fp32; autocast casts
    # the matmuls' weights to bf16 anyway) and its gradients are reduced and accumulated in fp32.
    # Block inputs are not cast, so the residual stream stays fp32 as under plain autocast; the root
    # (embeddings, tied head) stays fp32 too: it is gathered once per step.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    for block in model.blocks:  # each block is gathered just in time, then freed
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh)  # embeddings, final norm, head
    return model


def grad_sync(model, enabled):
    """Context for one micro-step: gradients are reduced only when enabled (the last micro-step).

    FSDP2 also keeps every block gathered from the first micro-step's forward to the last one's:
    two all-gathers per block per step (the first forward, the last backward) instead of two per
    micro-step. The gathered bf16 weights take half the memory of the unsharded fp32 gradients that
    accumulating without reduction holds anyway. The last micro-step reshards after forward and
    after backward like plain FSDP (ZeRO-3), so with grad_accum=1 nothing changes, and the
    optimizer always steps on sharded weights.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper hides DDP's no_sync
    if isinstance(model, DDP):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule (fully_shard)
        model.set_requires_gradient_sync(enabled)
        model.set_reshard_after_backward(enabled)
        for block in model.blocks:  # not the root: it is never resharded after forward
            block.set_reshard_after_forward(enabled)
    return contextlib.nullcontext()


def mean_across_ranks(value, d):
    """Average a float over the ranks (losses for logging)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item() / d.world_size


# ------------------------------------------------------------------------------------------------
# Full state dicts: the same format whether the model is plain, DDP or FSDP2 (collective calls:
# every rank must make them).

def _optimizers(optimizer):
    return getattr(optimizer, "optimizers", optimizer)  # optim.Optimizers holds several


def full_state(model, optimizer):
    """(model state, optimizer state), unsharded, on the CPU, keyed by parameter names."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=full),
            get_optimizer_state_dict(model, _optimizers(optimizer), options=full))


def load_optimizer_state(model, optimizer, optim_state):
    """Load a full optimizer state (from full_state) into this rank's, sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, _optimizers(optimizer), optim_state,
                             options=StateDictOptions(full_state_dict=True))


def any_rank(flag, d):
    """True on every rank if `flag` is True on any."""
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ------------------------------------------------------------------------------------------------
# Bytes on the wire

class CommCounter:
    """Counts the bytes each rank hands to all-reduce: DDP's gradient buckets (through a comm
    hook that wraps the default all-reduce) and DiLoCo's parameter deltas."""

    def __init__(self):
        self.bytes = 0

    def attach(self, ddp_model):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(None, bucket)

        ddp_model.register_comm_hook(None, hook)


class DiLoCo:
    """The outer loop of DiLoCo around any inner optimizer; call `after_inner_step(step)` after each
    inner optimizer step. Returns True on the steps where the workers synchronised."""

    def __init__(self, model, inner_steps, outer_lr, outer_momentum, d, counter=None):
        self.model, self.H, self.d, self.counter = model, inner_steps, d, counter
        self.outer_params = [p.detach().clone() for p in model.parameters()]  # θ_outer
        self.outer = torch.optim.SGD(self.outer_params, lr=outer_lr, momentum=outer_momentum,
                                     nesterov=outer_momentum > 0)

    @torch.no_grad()
    def after_inner_step(self, step):
        if (step + 1) % self.H:
            return False
        for outer, p in zip(self.outer_params, self.model.parameters()):
            delta = outer - p  # this worker's pseudo-gradient
            if self.d.enabled:
                dist.all_reduce(delta)
                delta /= self.d.world_size
            if self.counter is not None:
                self.counter.bytes += delta.numel() * delta.element_size()
            outer.grad = delta
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        for outer, p in zip(self.outer_params, self.model.parameters()):
            p.copy_(outer)
        return True

    def state_dict(self):
        return {"outer_params": [p.cpu() for p in self.outer_params], "outer": self.outer.state_dict()}

    def load_state_dict(self, state):
        for p, saved in zip(self.outer_params, state["outer_params"]):
            p.copy_(saved)
        self.outer.load_state_dict(state["outer"])
