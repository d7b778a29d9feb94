"""Calibration plumbing shared by every method: capture block inputs, run blocks, collect statistics.

Nothing here knows a model family: the adapter names the blocks and projections.
"""

from __future__ import annotations

import functools
import itertools
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import distributed, ops, spill


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once the wanted activations were seen."""


def to_device(obj, device, memo: dict | None = None):
    """``obj`` (tensors, possibly nested in tuples, lists, dicts) on ``device``; with ``memo``, an
    object seen before (by identity) is moved once and shared, so arguments several blocks share
    (a mask, one layer type's position embeddings) stay one copy."""
    if memo is not None and id(obj) in memo:
        return memo[id(obj)][1]
    if isinstance(obj, torch.Tensor):
        out = obj.to(device)
    elif isinstance(obj, tuple):
        out = tuple(to_device(o, device, memo) for o in obj)
    elif isinstance(obj, list):
        out = [to_device(o, device, memo) for o in obj]
    elif isinstance(obj, dict):
        out = {k: to_device(v, device, memo) for k, v in obj.items()}
    else:
        return obj
    if memo is not None:
        memo[id(obj)] = (obj, out)  # keeps obj alive so its id is not reused
    return out


def block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockInputs:
    """The hidden states entering a block, per batch, and the keyword arguments blocks receive.

    ``kwargs`` are the arguments of the block being run (one dict per batch); ``per_block[i]`` holds
    block i's (blocks differ: sliding-window and global layers get different masks and position
    embeddings). ``at(i)`` gives the same hidden states with block i's arguments.
    """

    hidden: list[torch.Tensor]  # one (batch, seqlen, hidden) tensor per batch, on the compute device
    kwargs: list[dict]  # per batch, for the current block (shared objects when the batch shapes match)
    per_block: list[list[dict]] | None = None

    def at(self, i: int) -> "BlockInputs":
        if self.per_block is None:
            return self
        return BlockInputs(self.hidden, self.per_block[i], self.per_block)

    def with_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        return BlockInputs(hidden, self.kwargs, self.per_block)


class _ArgRecorder(nn.Module):
    """Stands in for decoder block ``index`` during capture: records the arguments the model passes
    it and returns the hidden states unchanged (the block's own weights never run or move). Any
    attribute the model reads from a block (e.g. ``attention_type``) comes from the real block."""

    def __init__(self, real: nn.Module, index: int, sink):
        super().__init__()
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_sink", sink)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)

    def forward(self, *args, **kwargs):
        if args[1:]:
            raise RuntimeError("fasp_ext: decoder block received extra positional arguments; please report")
        h = args[0] if args else kwargs.pop("hidden_states")
        self._sink(self._index, h, kwargs)
        return h


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (no pass of the pruning runs it), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) and head is not model else None


def _move(model: nn.Module, device, skip: nn.Module | None = None) -> None:
    """``model.to(device)`` leaving meta tensors where they are (lazy loading keeps the blocks and
    the output head there until they are needed), and ``skip``'s own tensors too (a head tied to the
    input embeddings moves with them, as they share the tensor)."""
    fn = lambda t: t if t.is_meta else t.to(device)  # noqa: E731
    if skip is None:
        model._apply(fn)
        return
    skip._apply = lambda *args, **kwargs: skip  # this module's tensors stay where they are
    try:
        model._apply(fn)
    finally:
        del skip._apply


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int,
                         device: torch.device, offload: bool = False,
                         folder: spill.SpillFolder | None = None) -> BlockInputs:
    """Run the model up to its blocks for every calibration batch, keeping what block 0 receives and
    the keyword arguments every block receives.

    Every block is replaced meanwhile by a stand-in that records its arguments and passes the hidden
    states on untouched, so one pass per batch costs the embeddings alone, no block weight moves to
    ``device``, and each block gets exactly the arguments the model computes for it (its layer type's
    mask, sliding window and position embeddings). The arguments do not depend on the hidden states,
    only on the batch shape: they are kept once per shape. All keyword arguments are kept, as the
    arguments a decoder block receives change between transformers versions. With ``folder`` the
    hidden states go to files there as they come (fasp_ext/spill.py), not to memory.
    """
    saved = list(blocks)
    hidden = folder.batches() if folder is not None else []
    per_block: list[list[dict]] = [[] for _ in saved]
    by_shape: dict[tuple, dict] = {}
    memo: dict = {}
    seen = [0] * len(saved)

    def sink(i, h, kw):
        if i == 0:
            hidden.append(h.detach())
        key = (i, tuple(h.shape))
        if key not in by_shape:
            by_shape[key] = to_device({k: v for k, v in kw.items() if k != "hidden_states"}, device, memo)
        per_block[i].append(by_shape[key])
        seen[i] += 1
        if i == len(saved) - 1:
            raise _Stop

    orig_device = next(model.parameters()).device
    head = output_head(model)  # never runs here: it stays where it is
    for i, b in enumerate(saved):
        blocks[i] = _ArgRecorder(b, i, sink)
    try:
        _move(model, device, skip=head)
        tokens = tokens.to(device)  # one copy, then a view per batch
        for i in range(0, tokens.shape[0], batch_size):
            try:
                model(input_ids=tokens[i:i + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        _move(model, orig_device, skip=head)  # before the blocks are back
        for i, b in enumerate(saved):
            blocks[i] = b
    if len(set(seen)) != 1 or seen[0] != len(hidden):
        raise RuntimeError(f"fasp_ext: the model did not run every decoder block once per batch ({seen}); "
                           "please report")
    if folder is None:
        hidden = [_place(h, device, offload) for h in hidden]
    return BlockInputs(hidden, per_block[0], per_block)


def _place(h: torch.Tensor, device, offload: bool) -> torch.Tensor:
    """Hidden states on the compute device, or (``offload``) in host memory, pinned when the
    compute device is a GPU so each batch copies over asynchronously."""
    if not offload:
        return h.to(device)
    h = h.to("cpu")
    return h.pin_memory() if torch.device(device).type == "cuda" else h


@dataclass
class Stats:
    """Statistics of a projection's input (fp32): s = sum x^2, H = X^T X, mu = sum x, n = tokens.

    With ``val_every`` > 0, every ``val_every``-th calibration sample is also counted separately
    (H_val, mu_val, n_val) so the restoration's damping can be judged on held-out tokens. Until
    ``reduce`` those samples' Gram is in H_val only (each token goes through one Gram update, not
    two); ``reduce`` adds H_val into H, so from then on H holds every token.
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
    #: where ``store`` keeps the inputs (None: where they are computed)
    store_device: torch.device | None = None
    #: weighted token counts (``add``'s weight) not yet in n / n_val: device tensors, so a batch
    #: never waits for the device; ``reduce`` adds them (one synchronisation per matrix)
    n_pending: torch.Tensor | None = None
    n_val_pending: torch.Tensor | None = None
    #: whether H already holds the held-out samples' Gram (``reduce`` folds H_val into it once)
    val_in_H: bool = False
    #: on a GPU (``ops.defers``): nonzero once a batch held NaN/Inf, kept on the device and read by
    #: ``reduce`` (None: each batch is checked as it comes, by the op)
    bad: torch.Tensor | None = None
    #: what the Gram update multiplies (``PruneConfig.gram_precision``): "fp32", "tf32" or "bf16"
    precision: str = "fp32"
    #: whether the Gram updates write only H's (and H_val's) lower triangle (``ops.accumulate_stats``
    #: with ``lower``: half the flops), which ``reduce`` mirrors once into the whole matrix; on the
    #: GPU path (``bad`` set) until the first ``reduce``, full updates after it
    gram_lower: bool = False

    @staticmethod
    def new(m: int, device, gram: bool = True, store: bool = False, val_every: int = 0,
            precision: str = "fp32") -> "Stats":
        z = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        val = gram and val_every > 0
        bad = torch.zeros(1, dtype=torch.int32, device=device) if ops.defers(device) else None
        # under torch.distributed, samples are numbered globally so the held-out ones are the same
        return Stats(z(m), z(m, m) if gram else None, z(m), 0, [] if store else None, val_every if val else 0,
                     z(m, m) if val else None, z(m) if val else None, samples=distributed.sample_offset(),
                     bad=bad, precision=precision, gram_lower=gram and bad is not None)

    def reduce(self) -> "Stats":
        """Settle the weighted token counts and sum the statistics of every process
        (torch.distributed). Call it once the pass is over, before reading H, n or n_val.
        Lower-triangle Gram updates (``gram_lower``) are mirrored here into the whole matrices, the
        one place they are (later updates write the whole matrix)."""
        if self.gram_lower:
            for M in (self.H, self.H_val):
                if M is not None:
                    ops.mirror_lower_(M)
            self.gram_lower = False
        if self.H_val is not None and not self.val_in_H:
            self.H += self.H_val
            self.val_in_H = True
        self._settle()
        if distributed.active():
            distributed.all_reduce_(self.s, self.H, self.mu, self.H_val, self.mu_val, self.D)
            sums = distributed.all_reduce_numbers(self.n, self.n_val, device=self.s.device)
            # token counts stay integers; weighted sums (``add``'s weight) are floats
            self.n, self.n_val = (v if isinstance(o, float) else int(v) for v, o in zip(sums, (self.n, self.n_val)))
        return self

    def _settle(self) -> None:
        """Read back what the batches left on the device, in one copy: the NaN/Inf flag (raising the
        op's error, before anything uses the statistics) and the weighted token counts."""
        pending = [t for t in (self.n_pending, self.n_val_pending) if t is not None]
        if self.bad is None:
            vals = [float(t) for t in pending]
        elif pending:
            vals = torch.cat([self.bad.double()] + [t.double().reshape(1) for t in pending]).tolist()
            if vals.pop(0) != 0:
                raise ValueError(ops.NONFINITE_X)
        else:
            ops.raise_if_bad(self.bad)
            vals = []
        if self.n_pending is not None:
            self.n, self.n_pending = self.n + vals.pop(0), None
        if self.n_val_pending is not None:
            self.n_val, self.n_val_pending = self.n_val + vals.pop(0), None

    def _gram(self, X: torch.Tensor, s: torch.Tensor, H: torch.Tensor | None) -> None:
        """``ops.accumulate_stats`` at this statistic's Gram precision, the NaN/Inf flag kept on the
        device where ``bad`` is set."""
        p = self.precision
        acc = ops.accumulate_stats if self.bad is None else \
            functools.partial(ops.accumulate_stats, bad=self.bad, lower=self.gram_lower)
        if H is None or p == "fp32" or X.dtype != torch.float32:
            acc(X, s, H)
        elif X.device.type == "cuda":  # tensor cores: bf16 inputs or TF32 products, fp32 sums
            if p == "bf16":
                acc(X.to(torch.bfloat16), s, H)
            else:
                with _allow_tf32():
                    acc(X, s, H)
        elif p == "bf16":  # the CPU emulates it: X rounded to bf16 (s too, as on a GPU), fp32 sums
            acc(X.to(torch.bfloat16).float(), s, H)
        else:  # TF32 on the CPU: s from X itself, H from X with its mantissa rounded to 10 bits
            acc(X, s, None)
            acc(round_tf32(X), torch.zeros_like(s), H)

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Count the inputs ``x`` (..., m). ``weight`` (one per token, x's leading shape): token t then
        counts weight_t^2 times, i.e. s, H, mu, n (and the held-out and dense-target sums) are those of
        weight_t * x_t; the stored inputs stay as they are. NaN or Inf in the batch raises (the op's
        check, before it changes anything); a batch with held-out samples is counted in runs, so the
        runs before the bad one may be in already: statistics that raised are not to be used further
        (the pipeline stops on the error)."""
        m = x.shape[-1]
        x2 = x.reshape(-1, m)
        if weight is None:
            xs, wsq = x2, None
        else:
            w = weight.reshape(-1, 1).float()
            # bf16 inputs stay bf16 (the Gram's fast path on a GPU; the range is fp32's), others in fp32
            xs = x2 * w.to(x2.dtype) if x2.dtype == torch.bfloat16 else x2.float() * w
            wsq = w.square()
        b = x.shape[0] if x.dim() > 2 else 1
        is_val = [(self.samples + i) % self.val_every == self.val_every - 1 for i in range(b)] \
            if self.val_every else []
        if any(is_val):
            per_sample = (b, -1, m)  # samples first, as x is (batch, tokens, m) or one (tokens, m)
            self._add_runs(x2.reshape(per_sample), xs.reshape(per_sample),
                           None if wsq is None else wsq.reshape(b, -1, 1), is_val)
        else:
            self._gram(xs, self.s, self.H)
        # sum_t w_t^2 x_t as one (1 x n) @ (n x m) product: no weighted copy of the batch
        self.mu += x2.sum(0, dtype=torch.float32) if wsq is None else (wsq.t() @ x2.float()).reshape(-1)
        if wsq is None:
            self.n += x2.shape[0]
        else:
            self.n = float(self.n)  # a weighted count: a float from here on
            self.n_pending = wsq.sum() if self.n_pending is None else self.n_pending + wsq.sum()
        if self.store is not None:  # the correction's inputs live where the hidden states live
            self.store.append(x.detach().to(self.store_device) if self.store_device is not None else x.detach())
        if self.dense is not None:
            xd = self.dense[self.batches].reshape(-1, m)
            if xd.shape[0] != x2.shape[0]:
                raise RuntimeError("fasp_ext: dense and pruned calibration batches differ in size")
            if self.D is None:
                self.D = torch.zeros(m, m, device=x.device)
            self.D.addmm_((xd.float() if wsq is None else xd.float() * w).t(), xs.float())
            self.batches += 1
        self.samples += b

    def _add_runs(self, x3: torch.Tensor, xs3: torch.Tensor, w3: torch.Tensor | None, is_val: list[bool]) -> None:
        """The Gram and held-out sums of a batch holding held-out samples (``is_val``, one per sample),
        run by run of consecutive samples: the held-out ones into H_val (and into H once ``reduce``
        has folded H_val into it), the others into H; s takes every token. ``x3``: the raw inputs,
        ``xs3`` the weighted ones, ``w3`` the squared weights (None: unweighted), all samples first."""
        m = xs3.shape[-1]
        for val, run_ids in itertools.groupby(range(len(is_val)), key=is_val.__getitem__):
            ids = list(run_ids)
            i, j = ids[0], ids[-1] + 1
            run = xs3[i:j].reshape(-1, m)
            if not val:
                self._gram(run, self.s, self.H)
                continue
            self._gram(run, self.s, self.H_val)
            if self.val_in_H:
                self._gram(run, torch.zeros_like(self.s), self.H)
            if w3 is None:
                self.mu_val += run.sum(0, dtype=torch.float32)
                self.n_val += run.shape[0]
            else:
                wv = w3[i:j].reshape(-1, 1)
                self.mu_val += (wv.t() @ x3[i:j].reshape(-1, m).float()).reshape(-1)
                self.n_val = float(self.n_val)
                self.n_val_pending = wv.sum() if self.n_val_pending is None else self.n_val_pending + wv.sum()


GRAM_PRECISIONS = ("fp32", "tf32", "bf16")


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` with its mantissa rounded to TF32's 10 bits (to nearest, ties to even), as a
    tensor core rounds a TF32 product's inputs; NaN and Inf stay as they are."""
    b = x.contiguous().view(torch.int32)
    r = (b + 0xFFF + ((b >> 13) & 1)) & ~0x1FFF
    finite = torch.isfinite(x)
    return torch.where(finite, r.view(torch.float32), x)


@contextmanager
def _allow_tf32():
    """cuBLAS may use TF32 tensor cores for fp32 GEMMs (the CUDA Gram kernel honours the flag)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def fluctuation_scores(W: torch.Tensor, stats: Stats) -> torch.Tensor:
    """FLAP's fluctuation metric per input column: input variance over tokens x squared column norm."""
    n = max(stats.n, 1)
    var = (stats.s / n - (stats.mu / n) ** 2).clamp_min(0)
    return var * W.float().pow(2).sum(0)


def record(module: nn.Module, store: list, device: torch.device | None = None):
    """A forward pre-hook on ``module`` appending its input (per batch) to ``store`` (on ``device``,
    None: where it is computed)."""
    return module.register_forward_pre_hook(
        lambda _mod, args: store.append(args[0].detach() if device is None else args[0].detach().to(device)))


def collect(module: nn.Module, stats: Stats, stop: bool = False, norm: nn.Module | None = None):
    """A hook on ``module`` feeding its input to ``stats`` (and ending the pass if ``stop``).

    ``norm``: the RMS norm ``module``'s output passes through before the residual add. Each token is
    then weighed by the factor that norm scales it by, 1 / sqrt(mean(y^2) + eps) for the output y the
    module computed (a forward hook, so the module runs first): an error in y reaches the stream
    scaled by that factor, so the restoration fits what the model sees."""
    if norm is None:
        def hook(_mod, args):
            stats.add(args[0])
            if stop:
                raise _Stop

        return module.register_forward_pre_hook(hook)
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))

    def weighed(_mod, args, out):
        stats.add(args[0], weight=out.float().pow(2).mean(-1).add_(eps).rsqrt_())
        if stop:
            raise _Stop

    return module.register_forward_hook(weighed)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, keep_outputs: bool = True) -> list[torch.Tensor] | None:
    """Run ``block`` on every calibration batch; a hook may end a pass early (then no output)."""
    outs = spill.empty_like(inputs.hidden)
    dev = next(block.parameters()).device
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        try:  # hidden states kept in host memory come over one batch at a time, and go back
            out = block_output(block(h.to(dev, non_blocking=True), **kw))
        except _Stop:
            out = None
        if keep_outputs and out is not None:
            outs.append(out.to(h.device) if out.device != h.device else out)
    return outs if keep_outputs else None


#: attention forward function -> how many values it returns (checked once against the real forward),
#: or None where the replayed output did not match it (then that forward is never replayed)
_REPLAY_ARITY: dict = {}


def kept_linear(proj: nn.Linear, cols: torch.Tensor | None, width: int):
    """``z -> proj(z[..., cols])`` for inputs ``z`` of ``width`` columns. On a CPU as one GEMM with
    ``proj``'s weight padded by zero columns: gathering the kept columns of z costs more there than
    the GEMM itself (56 ms against 19 ms for 4096 x 1536 -> 1228 columns, 576 outputs)."""
    if cols is None:
        return proj
    W = proj.weight
    cols = torch.as_tensor(cols, device=W.device)
    if W.device.type != "cpu":
        return lambda z: proj(z.index_select(-1, cols))
    Wp = W.new_zeros(W.shape[0], width)
    Wp[:, cols] = W
    return lambda z: torch.nn.functional.linear(z, Wp, proj.bias)


@contextmanager
def replay_attention(attn: nn.Module, out_proj: str, stored: list[torch.Tensor], cols: torch.Tensor | None):
    """While active, ``attn`` returns ``attn.<out_proj>(z[..., cols])`` for the i-th call's stored
    output-projection input ``stored[i]`` instead of computing queries, keys, values and the attention.

    Exact after pruning value channels: the kept channels' attention values do not change, only the
    projection does. Saves recomputing the attention when a block is run again with its attention
    already pruned (sequential mode's MLP pass). The first call of each forward function in a
    process also runs the real forward, checks the replayed output against it and learns its
    return structure; a mismatch disables the replay for that function (with a warning).
    """
    real = attn.forward
    key = getattr(real, "__func__", real)
    had_own = "forward" in attn.__dict__
    calls = [0]
    project = []  # z -> out_proj(z[..., cols]), made at the first call

    def forward(*args, **kwargs):
        i = calls[0]
        calls[0] += 1
        arity = _REPLAY_ARITY.get(key, 0)
        if arity is None or i >= len(stored):
            return real(*args, **kwargs)
        proj = getattr(attn, out_proj)
        z = stored[i].to(proj.weight.device, non_blocking=True)
        if not project:
            project.append(kept_linear(proj, cols, z.shape[-1]))
        out = project[0](z)
        if arity:
            return (out,) + (None,) * (arity - 1)
        ref = real(*args, **kwargs)
        ref0 = ref[0] if isinstance(ref, tuple) else None
        tol = 1e-4 if out.dtype in (torch.float32, torch.float64) else 2e-2
        ok = ref0 is not None and ref0.shape == out.shape and bool(
            (ref0.float() - out.float()).norm() <= tol * ref0.float().norm().clamp_min(1e-30))
        _REPLAY_ARITY[key] = len(ref) if ok else None
        if not ok:
            logging.getLogger("fasp_ext").warning(
                "attention replay does not match %s; the attention is recomputed instead", key.__qualname__)
        return ref

    attn.forward = forward
    try:
        yield
    finally:
        if had_own:
            attn.forward = real
        else:
            del attn.forward


class BlockMover:
    """How a pass brings decoder block ``i`` to the compute device and puts it back afterwards.

    In memory (this class) a block is moved with ``.to()``; fasp_ext/lazy.py loads it from the
    checkpoint at its turn instead and writes and frees it when it is done, so only one block is
    ever materialised. ``final`` says the block is pruned and will not be needed again.
    """

    #: whether blocks are loaded one at a time (lazy loading): activations="auto" then keeps the
    #: calibration activations on disk (fasp_ext/spill.py)
    block_by_block = False

    def __init__(self, home: torch.device):
        self.home = home

    def fetch(self, blocks: nn.ModuleList, i: int, device: torch.device) -> nn.Module:
        return blocks[i].to(device)

    def release(self, blocks: nn.ModuleList, i: int, block: nn.Module, final: bool) -> None:
        blocks[i] = block.to(self.home)

    def captured(self, model: nn.Module) -> None:
        """Called once the block inputs are captured: nothing outside the blocks runs again."""


class ResidentMover(BlockMover):
    """The model (less its output head, which no pass runs) moved to the compute device once for the
    whole run (``load``) and home once at the end (``unload``): blocks stay where they are between
    passes. Chosen on a GPU when the model fits (``pipeline.plan_placement``)."""

    def __init__(self, home: torch.device, device: torch.device):
        super().__init__(home)
        self.device = device

    def load(self, model: nn.Module) -> None:
        _move(model, self.device, skip=output_head(model))

    def unload(self, model: nn.Module) -> None:
        _move(model, self.home, skip=output_head(model))

    def fetch(self, blocks: nn.ModuleList, i: int, device: torch.device) -> nn.Module:
        return blocks[i]

    def release(self, blocks: nn.ModuleList, i: int, block: nn.Module, final: bool) -> None:
        pass


class PrefetchMover(BlockMover):
    """A model too large for the GPU: each block comes from pinned host memory, and the next block is
    copied on a side stream while the current one runs (``pipeline.plan_placement``)."""

    def __init__(self, home: torch.device, device: torch.device):
        super().__init__(home)
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.ready: dict[int, object] = {}  # block -> event of its copy on the side stream

    def _start(self, blocks: nn.ModuleList, i: int) -> None:
        if i >= len(blocks) or i in self.ready:
            return
        dev = self.device

        def copy(t):
            if t.is_meta or t.device == dev:
                return t
            return (t if t.is_pinned() else t.pin_memory()).to(dev, non_blocking=True)

        with torch.cuda.stream(self.stream):
            blocks[i]._apply(copy)
            self.ready[i] = self.stream.record_event()

    def fetch(self, blocks: nn.ModuleList, i: int, device: torch.device) -> nn.Module:
        self._start(blocks, i)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.ready.pop(i))
        for t in itertools.chain(blocks[i].parameters(), blocks[i].buffers()):
            if t.device == self.device:  # made on the side stream, used (and freed) on this one
                t.record_stream(current)
        self._start(blocks, i + 1)
        return blocks[i]
