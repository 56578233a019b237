"""The layer stack (bench/measure/stack.py): reversible backprop and checkpointing equal autograd, RNG replay, memory."""

from __future__ import annotations

import pytest
import torch

import attention_impls.reformer  # noqa: F401  (registers "reformer" until it joins the built-in list)
from attention_impls import AttentionModule, get
from attention_impls.full import full_attention
from bench.measure.stack import TransformerStack, stack_flops, stack_memory_bytes

D_MODEL = 32
HEADS = 4
SEQ_LEN = 45


def make_stack(impl, *, residual: str, causal: bool = False, depth: int = 3, seq_len: int = SEQ_LEN, seed: int = 0):
    torch.manual_seed(seed)
    spec = get(impl) if isinstance(impl, str) else impl
    return TransformerStack(
        spec, depth=depth, d_model=D_MODEL, heads=HEADS, seq_len=seq_len, residual=residual, causal=causal
    )


def gradients(stack: TransformerStack, x: torch.Tensor, weights: torch.Tensor, *, reversible_backprop: bool):
    """d/d(input, every parameter) of sum(stack(x) * weights)."""
    x = x.detach().requires_grad_(True)
    out = stack(x, reversible_backprop=reversible_backprop)
    params = list(stack.parameters())
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    return out.detach(), grads


def max_rel_error(first, second) -> float:
    return max(float((a - b).norm() / b.norm().clamp_min(1e-300)) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("impl", ["full", "reformer", "sdpa"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_reversible_gradients_equal_autograd(impl: str, causal: bool) -> None:
    """Reconstruction + recomputation gives the gradients autograd gives on the same architecture."""
    stack = make_stack(impl, residual="reversible", causal=causal).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, SEQ_LEN, D_MODEL, generator=gen, dtype=torch.float64)
    weights = torch.randn(2, SEQ_LEN, D_MODEL, generator=gen, dtype=torch.float64)
    out_rev, grads_rev = gradients(stack, x, weights, reversible_backprop=True)
    out_ref, grads_ref = gradients(stack, x, weights, reversible_backprop=False)
    assert torch.equal(out_rev, out_ref)
    assert len(grads_rev) == 1 + len(list(stack.parameters()))
    assert max_rel_error(grads_rev, grads_ref) <= 1e-8
    assert all(g.abs().sum() > 0 for g in grads_rev)


@pytest.mark.parametrize("impl", ["full", "reformer"])
def test_checkpointed_layers_equal_the_standard_stack(impl: str) -> None:
    """Checkpointing changes what is stored, not what is computed: same output, same gradients (float64)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, SEQ_LEN, D_MODEL, generator=gen, dtype=torch.float64)
    weights = torch.randn(2, SEQ_LEN, D_MODEL, generator=gen, dtype=torch.float64)
    results = {}
    for residual in ("standard", "checkpoint"):
        stack = make_stack(impl, residual=residual, causal=True).double()  # the same seed: the same parameters
        torch.manual_seed(7)  # the Reformer draws its hashes from the RNG: the same draws for both
        results[residual] = gradients(stack, x, weights, reversible_backprop=True)
    (out_std, grads_std), (out_ckpt, grads_ckpt) = results["standard"], results["checkpoint"]
    assert torch.equal(out_ckpt, out_std)
    assert max_rel_error(grads_ckpt, grads_std) <= 1e-12
    assert all(g.abs().sum() > 0 for g in grads_ckpt)


class NoisyAttention(AttentionModule):
    """Full attention times fresh random noise from torch's RNG at every call (as dropout would be)."""

    family = "noisy"
    paper = "https://example.org"
    time_complexity = "O(n^2 d)"
    memory_complexity = "O(n^2)"

    def forward(self, q, k, v, *, causal=False):
        noise = 1.0 + 0.5 * torch.rand(q.shape, dtype=q.dtype, device=q.device)
        return full_attention(q, k, v, causal=causal) * noise


def noisy_factory(*, seq_len: int, heads: int, head_dim: int) -> NoisyAttention:
    return NoisyAttention(NoisyAttention.Config(), seq_len=seq_len, heads=heads, head_dim=head_dim)


def test_recomputation_replays_the_forward_randomness() -> None:
    """An attention drawing random numbers in forward: recomputation must see the same numbers."""
    stack = make_stack(noisy_factory, residual="reversible", depth=4).double()
    x = torch.randn(2, SEQ_LEN, D_MODEL, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, SEQ_LEN, D_MODEL, dtype=torch.float64)
    torch.manual_seed(7)
    out_rev = stack(x)
    state_after_forward = torch.get_rng_state()
    grads_rev = torch.autograd.grad((out_rev * weights).sum(), [x, *stack.parameters()])
    assert torch.equal(torch.get_rng_state(), state_after_forward), "backward must leave the global RNG alone"
    torch.manual_seed(7)
    out_ref = stack(x, reversible_backprop=False)
    grads_ref = torch.autograd.grad((out_ref * weights).sum(), [x, *stack.parameters()])
    assert torch.equal(out_rev, out_ref)
    assert max_rel_error(grads_rev, grads_ref) <= 1e-8


def test_backward_accumulates_into_parameter_grads() -> None:
    """loss.backward() works as usual: .grad of input and parameters filled, twice means summed."""
    stack = make_stack("full", residual="reversible").double()
    x = torch.randn(1, SEQ_LEN, D_MODEL, dtype=torch.float64, requires_grad=True)
    stack(x).square().mean().backward()
    first = [p.grad.clone() for p in stack.parameters()]
    stack(x).square().mean().backward()
    for p, g in zip(stack.parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("residual", ["standard", "reversible", "checkpoint"])
def test_stack_trains(residual: str) -> None:
    """A few Adam steps on a fixed regression target lower the loss; gradients stay finite."""
    stack = make_stack("reformer", residual=residual, causal=True, depth=2)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, SEQ_LEN, D_MODEL, generator=gen)
    target = torch.randn(4, SEQ_LEN, D_MODEL, generator=gen)
    optimizer = torch.optim.Adam(stack.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = (stack(x) - target).square().mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in stack.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_shapes_and_no_graph_under_no_grad() -> None:
    for residual in ("standard", "reversible", "checkpoint"):
        stack = make_stack("full", residual=residual)
        x = torch.randn(3, SEQ_LEN, D_MODEL)
        with torch.no_grad():
            out = stack(x)
        assert out.shape == x.shape and out.grad_fn is None
    with pytest.raises(ValueError, match="residual"):
        make_stack("full", residual="revnet")


def test_shared_qk_attention_gets_no_key_projection() -> None:
    reformer = make_stack("reformer", residual="standard", depth=1)
    full = make_stack("full", residual="standard", depth=1)
    assert reformer.layers[0].f.to_qkv.out_features == 2 * D_MODEL
    assert full.layers[0].f.to_qkv.out_features == 3 * D_MODEL


def peak_bytes_fwd_bwd(stack: TransformerStack, x: torch.Tensor) -> int:
    from bench.measure.memory import measure_peak

    def step() -> None:
        stack(x.requires_grad_(True)).sum().backward()

    return measure_peak(step, device="cpu").peak_bytes


def test_reversible_and_checkpointed_memory_hardly_grows_with_depth() -> None:
    """fwd+bwd peak: standard keeps every layer's activations, reversible about one layer's, checkpointed
    one layer's and every layer's input."""
    seq_len = 256
    x = torch.randn(2, seq_len, D_MODEL)
    growth = {}
    for residual in ("standard", "reversible", "checkpoint"):
        shallow = peak_bytes_fwd_bwd(make_stack("full", residual=residual, depth=1, seq_len=seq_len), x.clone())
        deep = peak_bytes_fwd_bwd(make_stack("full", residual=residual, depth=6, seq_len=seq_len), x.clone())
        growth[residual] = deep - shallow
    # one full-attention layer stores ~ batch * heads * n^2 floats (several times): 2 MB per layer here
    assert growth["standard"] > 5 * 2 * HEADS * seq_len * seq_len * 4, growth
    assert growth["reversible"] < 0.2 * growth["standard"], growth
    assert growth["checkpoint"] < 0.2 * growth["standard"], growth


def test_cost_model() -> None:
    spec = get("full")
    kwargs = {"batch": 2, "seq_len": 1024, "d_model": 256, "heads": 4, "depth": 6}
    fwd = stack_flops(spec, **kwargs)
    assert fwd > 6 * spec.flops(batch=2, heads=4, seq_len=1024, head_dim=64)
    standard = stack_flops(spec, **kwargs, mode="fwd+bwd")
    reversible = stack_flops(spec, **kwargs, mode="fwd+bwd", residual="reversible")
    checkpointed = stack_flops(spec, **kwargs, mode="fwd+bwd", residual="checkpoint")
    assert fwd < standard < reversible == checkpointed  # both run every layer's forward once more
    mem_standard = stack_memory_bytes(spec, **kwargs, itemsize=4, mode="fwd+bwd")
    mem_reversible = stack_memory_bytes(spec, **kwargs, itemsize=4, mode="fwd+bwd", residual="reversible")
    assert 0 < mem_reversible < mem_standard
    assert 0 < stack_memory_bytes(spec, **kwargs, itemsize=4, mode="fwd+bwd", residual="checkpoint") < mem_standard
    assert stack_memory_bytes(spec, **kwargs, itemsize=4) > 0
    with pytest.raises(ValueError, match="mode"):
        stack_flops(spec, **kwargs, mode="bwd")


def test_a_sweep_measures_checkpointed_stacks(tmp_path) -> None:
    import json

    from cli_helpers import attnbench

    from bench.cases import RESIDUALS
    from bench.report.figures import RESIDUAL_STYLES

    assert set(RESIDUAL_STYLES) == set(RESIDUALS)  # the layer figure draws every residual kind
    out = tmp_path / "layers.jsonl"
    result = attnbench(
        "run", "--impls", "full", "--scope", "layers", "--depths", "2", "--residual", "standard,checkpoint",
        "--seq-lens", "64", "--modes", "fwd+bwd", "--min-time", "0.01", "--processes", "1", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = {r["case"]["residual"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert {k: r["status"] for k, r in records.items()} == {"standard": "ok", "checkpoint": "ok"}
    assert records["checkpoint"]["flops"] == pytest.approx(4 / 3 * records["standard"]["flops"])
    report = tmp_path / "report"
    assert attnbench("report", str(out), "--out", str(report)).returncode == 0
    assert "checkpoint" in (report / "README.md").read_text()
