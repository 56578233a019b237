"""A stack of transformer layers around any registered attention: the benchmark's ``--scope layers``.

Reversible residual layers (RevNet): Gomez et al. 2017, "The Reversible Residual Network: Backpropagation
Without Storing Activations", https://arxiv.org/abs/1707.04585, as used by the Reformer
(https://arxiv.org/abs/2001.04451).

Each layer has two sublayers, both pre-norm:

* ``f``: LayerNorm, Q/K/V projections, the attention implementation on (batch, heads, seq_len, head_dim),
  output projection;
* ``g``: LayerNorm, Linear(d_model, ffn_mult * d_model), GELU, Linear back.

``residual="standard"``: ``x = x + f(x); x = x + g(x)``. Autograd stores every layer's activations.

``residual="checkpoint"``: the standard architecture with activation checkpointing per layer
(``torch.utils.checkpoint``, non-reentrant; Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost", https://arxiv.org/abs/1604.06174): each layer keeps only its input in forward and is run again,
with its graph, when backward reaches it. Memory for activations: the layers' inputs plus one layer's;
the price is one more forward per layer, as for reversible layers. The recomputation replays the RNG
(``preserve_rng_state``).

``residual="reversible"``: the input is duplicated into ``(x1, x2) = (x, x)``; each layer computes
``y1 = x1 + f(x2); y2 = x2 + g(y1)``; the stack returns ``(y1 + y2) / 2``. A custom autograd function runs
the whole stack under ``no_grad`` and keeps only the last layer's outputs; backward walks the layers from
the top, rebuilds each layer's inputs from its outputs (``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``) and
recomputes ``g`` and ``f`` with grad enabled to backpropagate through them, one layer at a time. Memory
for activations is then that of one layer, whatever the depth; the price is one more forward per layer.

Recomputation must see the same randomness as the forward did (an attention that draws random numbers in
forward, dropout): the CPU RNG state (and the CUDA one on a GPU) is recorded before each sublayer and
restored, in a forked RNG, when it is recomputed; the global RNG is left as the forward left it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from attention_impls.base import AttentionModule
from attention_impls.registry import ImplSpec
from bench.cases import RESIDUALS

__all__ = [
    "AttentionSublayer",
    "FeedForward",
    "TransformerStack",
    "stack_flops",
    "stack_memory_bytes",
]

AttentionFactory = Callable[..., AttentionModule]  # called as factory(seq_len=..., heads=..., head_dim=...)


def _build_attention(spec_or_factory: ImplSpec | AttentionFactory, *, seq_len: int, heads: int, head_dim: int):
    if isinstance(spec_or_factory, ImplSpec):
        return spec_or_factory.build(seq_len=seq_len, heads=heads, head_dim=head_dim)
    return spec_or_factory(seq_len=seq_len, heads=heads, head_dim=head_dim)


class AttentionSublayer(nn.Module):
    """``f``: LayerNorm, Q/K/V projections, attention, output projection; (batch, seq_len, d_model) in and out.

    With a shared query-key attention (``shared_qk``, the Reformer) no key projection is made: k = q.
    """

    def __init__(self, attention: AttentionModule, *, d_model: int, heads: int, causal: bool) -> None:
        super().__init__()
        assert d_model % heads == 0, f"d_model ({d_model}) must be a multiple of heads ({heads})"
        self.heads = heads
        self.head_dim = d_model // heads
        self.causal = causal
        self.shared_qk = bool(getattr(attention, "shared_qk", False))
        self.norm = nn.LayerNorm(d_model)
        self.to_qkv = nn.Linear(d_model, (2 if self.shared_qk else 3) * d_model)
        self.attention = attention
        self.to_out = nn.Linear(d_model, d_model)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        x = x.view(batch, seq_len, self.heads, self.head_dim)  # (batch, seq_len, heads, head_dim)
        return x.transpose(1, 2)  # (batch, heads, seq_len, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, d_model = x.shape
        projected = self.to_qkv(self.norm(x))  # (batch, seq_len, 2 or 3 * d_model)
        parts = [self._split_heads(p) for p in projected.chunk(2 if self.shared_qk else 3, dim=-1)]
        if self.shared_qk:
            q, v = parts
            k = q
        else:
            q, k, v = parts
        out = self.attention(q, k, v, causal=self.causal)  # (batch, heads, seq_len, head_dim)
        out = out.transpose(1, 2).reshape(batch, seq_len, d_model)  # (batch, seq_len, d_model)
        return self.to_out(out)


class FeedForward(nn.Module):
    """``g``: LayerNorm, Linear, GELU, Linear; (batch, seq_len, d_model) in and out."""

    def __init__(self, *, d_model: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, ffn_mult * d_model)
        self.act = nn.GELU()
        self.down = nn.Linear(ffn_mult * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(self.norm(x))))


class _Layer(nn.Module):
    f: AttentionSublayer
    g: FeedForward

    def __init__(self, attention: AttentionModule, *, d_model: int, heads: int, ffn_mult: int, causal: bool):
        super().__init__()
        self.f = AttentionSublayer(attention, d_model=d_model, heads=heads, causal=causal)
        self.g = FeedForward(d_model=d_model, ffn_mult=ffn_mult)

    def standard(self, x: torch.Tensor) -> torch.Tensor:
        """The standard residual layer: ``x + f(x)``, then ``+ g(.)``; (batch, seq_len, d_model) in and out."""
        x = x + self.f(x)
        return x + self.g(x)


# --- RNG capture, so that recomputation sees the forward's random numbers ----------------------------
def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def _replay(fn: nn.Module, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """fn(x) with the RNG as it was when ``state`` was taken; the global RNG is left untouched."""
    cpu_state, cuda_state = state
    devices = [x.device] if cuda_state is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, x.device)
        return fn(x)


class _ReversibleStackFunction(torch.autograd.Function):
    """The whole reversible stack: forward without storing activations, backward by reconstruction."""

    @staticmethod
    def forward(ctx, x1: torch.Tensor, x2: torch.Tensor, layers: Sequence[_Layer], *params: torch.Tensor):
        states = []
        with torch.no_grad():
            for layer in layers:
                f_state = _rng_state(x2.device)
                x1 = x1 + layer.f(x2)  # y1
                g_state = _rng_state(x1.device)
                x2 = x2 + layer.g(x1)  # y2
                states.append((f_state, g_state))
        ctx.layers = layers
        ctx.states = states
        ctx.params = params
        ctx.save_for_backward(x1, x2)  # the last layer's outputs: all that is kept
        return x1, x2

    @staticmethod
    def backward(ctx, dy1: torch.Tensor, dy2: torch.Tensor):
        y1, y2 = ctx.saved_tensors
        layers = ctx.layers
        param_grads: dict[int, torch.Tensor] = {}

        def accumulate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
            for p, grad in zip(params, grads, strict=True):
                if grad is not None:
                    param_grads[id(p)] = grad if id(p) not in param_grads else param_grads[id(p)] + grad

        for layer, (f_state, g_state) in zip(reversed(layers), reversed(ctx.states), strict=True):
            g_params = [p for p in layer.g.parameters() if p.requires_grad]
            f_params = [p for p in layer.f.parameters() if p.requires_grad]
            # y2 = x2 + g(y1): recompute g(y1), backpropagate dy2 through it, rebuild x2
            with torch.enable_grad():
                y1 = y1.detach().requires_grad_(True)
                g_out = _replay(layer.g, y1, g_state)
                grads = torch.autograd.grad(g_out, (y1, *g_params), dy2, allow_unused=True)
            accumulate(g_params, grads[1:])
            with torch.no_grad():
                x2 = y2 - g_out
                dy1 = dy1 if grads[0] is None else dy1 + grads[0]  # all of dL/dy1: directly and through g
            del g_out, grads
            # y1 = x1 + f(x2): recompute f(x2), backpropagate dy1 through it, rebuild x1
            with torch.enable_grad():
                x2 = x2.detach().requires_grad_(True)
                f_out = _replay(layer.f, x2, f_state)
                grads = torch.autograd.grad(f_out, (x2, *f_params), dy1, allow_unused=True)
            accumulate(f_params, grads[1:])
            with torch.no_grad():
                x1 = y1 - f_out
                dy2 = dy2 if grads[0] is None else dy2 + grads[0]  # dL/dx2: directly and through f
            del f_out, grads
            y1, y2 = x1.detach(), x2.detach()
            # dL/dx1 = dy1 (x1 enters y1 with identity): the layer below sees (dy1, dy2) as its output grads

        return (dy1, dy2, None, *(param_grads.get(id(p)) for p in ctx.params))


class TransformerStack(nn.Module):
    """``depth`` pre-norm transformer layers around one attention implementation.

    ``spec_or_factory`` is an :class:`~attention_impls.registry.ImplSpec` (built with ``spec.build``) or a
    callable ``factory(*, seq_len, heads, head_dim) -> AttentionModule``; one attention module is built per
    layer, for ``seq_len``. Input and output: (batch, seq_len, d_model).
    """

    def __init__(
        self,
        spec_or_factory: ImplSpec | AttentionFactory,
        *,
        depth: int,
        d_model: int,
        heads: int,
        seq_len: int,
        ffn_mult: int = 4,
        residual: str = "standard",
        causal: bool = False,
    ) -> None:
        super().__init__()
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {', '.join(RESIDUALS)}, got {residual!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.residual = residual
        self.causal = causal
        self.d_model = d_model
        head_dim = d_model // heads
        # a ModuleList (registers the layers), typed as the sequence of _Layer it is
        self.layers: Sequence[_Layer] = nn.ModuleList(  # type: ignore[assignment]
            _Layer(
                _build_attention(spec_or_factory, seq_len=seq_len, heads=heads, head_dim=head_dim),
                d_model=d_model,
                heads=heads,
                ffn_mult=ffn_mult,
                causal=causal,
            )
            for _ in range(depth)
        )

    def extra_repr(self) -> str:
        return f"residual={self.residual!r}, causal={self.causal}"

    def forward(self, x: torch.Tensor, *, reversible_backprop: bool = True) -> torch.Tensor:
        """(batch, seq_len, d_model) -> (batch, seq_len, d_model).

        ``reversible_backprop=False`` computes the same reversible architecture with ordinary autograd
        (activations stored), for tests and comparisons; it has no effect on a standard stack.
        """
        assert x.dim() == 3 and x.shape[-1] == self.d_model, (
            f"expected (batch, seq_len, {self.d_model}), got {tuple(x.shape)}"
        )
        if self.residual == "standard":
            for layer in self.layers:
                x = layer.standard(x)
            return x
        if self.residual == "checkpoint":
            for layer in self.layers:
                x = checkpoint(layer.standard, x, use_reentrant=False) if torch.is_grad_enabled() else layer.standard(x)
            return x
        if not reversible_backprop:
            x1, x2 = x, x
            for layer in self.layers:
                x1 = x1 + layer.f(x2)
                x2 = x2 + layer.g(x1)
            return (x1 + x2) / 2
        # the parameters are inputs of the function, so that their gradients flow back through autograd
        # (backward() and torch.autograd.grad alike), not written into .grad behind its back
        params = [p for p in self.parameters() if p.requires_grad]
        y1, y2 = _ReversibleStackFunction.apply(x, x, list(self.layers), *params)
        return (y1 + y2) / 2


# --- cost model for the runner ---------------------------------------------------------------------
def _layer_dense_flops(*, batch: int, seq_len: int, d_model: int, ffn_mult: int, shared_qk: bool) -> float:
    tokens = batch * seq_len
    projections = 2.0 * tokens * d_model * d_model * ((2 if shared_qk else 3) + 1)  # q(k)v in, out
    ffn = 2.0 * tokens * d_model * ffn_mult * d_model * 2
    return projections + ffn


def _head_dim_for(mode: str, *, d_model: int, heads: int) -> int:
    """The per-head width of a cost-model call, after checking its mode."""
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
    return d_model // heads


def stack_flops(
    spec: ImplSpec,
    *,
    batch: int,
    seq_len: int,
    d_model: int,
    heads: int,
    depth: int,
    ffn_mult: int = 4,
    causal: bool = False,
    residual: str = "standard",
    mode: str = "fwd",
) -> float:
    """Floating-point operations of one call: ``mode`` "fwd", or "fwd+bwd" (backward ~ 2x forward; the
    reversible and checkpointed stacks recompute every layer's forward once more)."""
    head_dim = _head_dim_for(mode, d_model=d_model, heads=heads)
    attention = spec.flops(batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim, causal=causal)
    layer = attention + _layer_dense_flops(
        batch=batch, seq_len=seq_len, d_model=d_model, ffn_mult=ffn_mult, shared_qk=spec.shared_qk
    )
    forward = depth * layer
    if mode == "fwd":
        return forward
    return forward * (3.0 if residual == "standard" else 4.0)


def stack_memory_bytes(
    spec: ImplSpec,
    *,
    batch: int,
    seq_len: int,
    d_model: int,
    heads: int,
    depth: int,
    itemsize: int,
    ffn_mult: int = 4,
    causal: bool = False,
    residual: str = "standard",
    mode: str = "fwd",
    device: str = "cpu",
    dtype: str | None = None,
) -> float:
    """Rough upper estimate of the bytes one call allocates beyond its input (parameters included)."""
    head_dim = _head_dim_for(mode, d_model=d_model, heads=heads)
    params = depth * (d_model * d_model * (4 + 2 * ffn_mult) + d_model * (8 + ffn_mult)) * itemsize
    tokens = batch * seq_len
    attention = spec.memory_bytes(
        batch=batch,
        heads=heads,
        seq_len=seq_len,
        head_dim=head_dim,
        itemsize=itemsize,
        causal=causal,
        device=device,
        dtype=dtype,
    )
    # one layer's live tensors: norm, q/k/v, attention output, projection, the FFN's hidden layer
    layer_work = attention + tokens * d_model * (8 + 2 * ffn_mult) * itemsize
    if mode == "fwd":
        return params + layer_work + 2 * tokens * d_model * itemsize
    if residual == "reversible":
        # outputs of the last layer, gradients of both streams, one layer recomputed with its graph
        return 2 * params + 2 * layer_work + 6 * tokens * d_model * itemsize
    if residual == "checkpoint":
        # every layer's input, one layer recomputed with its graph, output and gradients
        return 2 * params + 2 * layer_work + (depth + 4) * tokens * d_model * itemsize
    # every layer keeps its activations (the attention's own included) until backward
    return 2 * params + depth * layer_work + 2 * tokens * d_model * itemsize
