"""Calibration plumbing shared by every method: capture block inputs, run blocks, collect statistics.

Nothing here knows a model family: the adapter names the blocks and projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once the wanted activations were seen."""


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockInputs:
    """The hidden states entering a block, per batch, and the keyword arguments blocks receive."""

    hidden: list[torch.Tensor]  # one (batch, seqlen, hidden) tensor per batch, on the compute device
    kwargs: list[dict]  # per batch (shared objects when the batch shapes match)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int,
                         device: torch.device) -> BlockInputs:
    """Run the model up to its first block for every calibration batch, keeping what block 0 receives.

    The other blocks are detached from the model meanwhile, so only the embeddings and block 0 move
    to ``device``; a hook stops each pass as block 0 starts, so this costs the embeddings alone. All positional and keyword arguments are kept, as
    the arguments a decoder block receives change between transformers versions.
    """
    saved = list(blocks)
    del blocks[1:]
    first = blocks[0]
    hidden: list[torch.Tensor] = []
    kwargs: list[dict] = []
    by_shape: dict[tuple, dict] = {}

    def hook(_mod, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        kw = dict(kw)
        if args[1:]:
            raise RuntimeError("fasp_ext: decoder block received extra positional arguments; please report")
        hidden.append(h.detach())
        key = tuple(h.shape)
        if key not in by_shape:
            by_shape[key] = to_device({k: v for k, v in kw.items() if k != "hidden_states"}, device)
        kwargs.append(by_shape[key])
        raise _Stop

    orig_device = next(model.parameters()).device
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.to(device)
        for i in range(0, tokens.shape[0], batch_size):
            try:
                model(input_ids=tokens[i:i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        model.to(orig_device)
        blocks.extend(saved[1:])
    return BlockInputs([h.to(device) for h in hidden], kwargs)


@dataclass
class Stats:
    """Statistics of a projection's input (fp32): s = sum x^2, H = X^T X, mu = sum x, n = tokens.

    With ``val_every`` > 0, every ``val_every``-th calibration sample is also counted separately
    (H_val, mu_val, n_val) so the restoration's damping can be judged on held-out tokens.
    """

    s: torch.Tensor
    H: torch.Tensor | None
    mu: torch.Tensor
    n: int = 0
    store: list[torch.Tensor] | None = None
    val_every: int = 0
    H_val: torch.Tensor | None = None
    mu_val: torch.Tensor | None = None
    n_val: int = 0
    samples: int = 0
    #: dense-target restoration: the dense model's inputs of the same projection, per batch, and
    #: D = sum x_dense x^T accumulated against this (pruned) model's inputs batch by batch
    dense: list[torch.Tensor] | None = None
    D: torch.Tensor | None = None
    batches: int = 0

    @staticmethod
    def new(m: int, device, gram: bool = True, store: bool = False, val_every: int = 0) -> "Stats":
        z = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        val = gram and val_every > 0
        return Stats(z(m), z(m, m) if gram else None, z(m), 0, [] if store else None, val_every if val else 0,
                     z(m, m) if val else None, z(m) if val else None)

    def add(self, x: torch.Tensor) -> None:
        m = x.shape[-1]
        x2 = x.reshape(-1, m)
        ops.accumulate_stats(x2, self.s, self.H)
        self.mu += x2.sum(0, dtype=torch.float32)
        self.n += x2.shape[0]
        if self.store is not None:
            self.store.append(x.detach())
        if self.dense is not None:
            xd = self.dense[self.batches].reshape(-1, m)
            if xd.shape[0] != x2.shape[0]:
                raise RuntimeError("fasp_ext: dense and pruned calibration batches differ in size")
            if self.D is None:
                self.D = torch.zeros(m, m, device=x.device)
            self.D.addmm_(xd.t().float(), x2.float())
            self.batches += 1
        b = x.shape[0] if x.dim() > 2 else 1
        if self.val_every:
            idx = torch.arange(self.samples, self.samples + b)
            sel = torch.nonzero(idx % self.val_every == self.val_every - 1).flatten()
            if sel.numel():
                xv = (x if x.dim() > 2 else x.unsqueeze(0)).index_select(0, sel.to(x.device)).reshape(-1, m)
                ops.accumulate_stats(xv, torch.zeros_like(self.s), self.H_val)
                self.mu_val += xv.sum(0, dtype=torch.float32)
                self.n_val += xv.shape[0]
        self.samples += b


def fluctuation_scores(W: torch.Tensor, stats: Stats) -> torch.Tensor:
    """FLAP's fluctuation metric per input column: input variance over tokens x squared column norm."""
    n = max(stats.n, 1)
    var = (stats.s / n - (stats.mu / n) ** 2).clamp_min(0)
    return var * W.float().pow(2).sum(0)


def record(module: nn.Module, store: list):
    """A forward pre-hook on ``module`` appending its input (per batch) to ``store``."""
    return module.register_forward_pre_hook(lambda _mod, args: store.append(args[0].detach()))


def collect(module: nn.Module, stats: Stats, stop: bool = False):
    """A forward pre-hook on ``module`` feeding its input to ``stats`` (and ending the pass if ``stop``)."""

    def hook(_mod, args):
        stats.add(args[0])
        if stop:
            raise _Stop

    return module.register_forward_pre_hook(hook)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, keep_outputs: bool = True) -> list[torch.Tensor] | None:
    """Run ``block`` on every calibration batch; a hook may end a pass early (then no output)."""
    outs = []
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        try:
            out = block_output(block(h, **kw))
        except _Stop:
            out = None
        if keep_outputs and out is not None:
            outs.append(out)
    return outs if keep_outputs else None
