"""attention_impls.chunked and blocks.unfold: blockwise autograd whose backward costs the blocks, not the inputs."""

from __future__ import annotations

import pytest
import torch

from attention_impls import get
from attention_impls.blocks import unfold
from attention_impls.chunked import Rows, Span, chunked

torch.manual_seed(0)


def _inputs():
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    return x, y


INDEX = [torch.tensor([0, 2, 2, 7]), torch.tensor([9, 1])]  # a repeated row: its gradients add up
READS = [(Span(0, 0, 4), Rows(0, INDEX[0])), (Span(0, 4, 2), Rows(0, INDEX[1]))]


def _chunk(number: int, a: torch.Tensor, b: torch.Tensor):
    return a * b.sum(dim=0).exp(), (a.detach() ** 2).sum(dim=1)  # a differentiable output and a detached one


def _plain(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:4] * y[INDEX[0]].sum(dim=0).exp(), x[4:6] * y[INDEX[1]].sum(dim=0).exp()])


def test_same_values_and_gradients_as_plain_autograd() -> None:
    x, y = _inputs()
    out, detached = chunked(_chunk, READS, x, y)
    expected = _plain(x, y)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not detached.requires_grad  # what fn returns without a graph stays out of the graph
    weights = torch.randn_like(expected)
    got = torch.autograd.grad(out, (x, y), weights)
    want = torch.autograd.grad(expected, (x, y), weights)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=1e-14)


def test_inputs_without_grad_get_none_and_cat_along_another_dim() -> None:
    x, y = _inputs()
    y = y.detach()
    reads = [(Span(1, 0, 2), Span(1, 0, 2)), (Span(1, 2, 1), Span(1, 2, 1))]
    (out,) = chunked(lambda number, a, b: (a * b,), reads, x, y, dim=1)
    torch.testing.assert_close(out, x * y)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, y)


def test_a_second_backward_is_refused_with_one_line() -> None:
    x, y = _inputs()
    out = chunked(_chunk, READS, x, y)[0].sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        out.backward()


@pytest.mark.parametrize(
    ("shape", "dim", "size", "step"),
    [
        ((2, 3, 17, 4), 2, 5, 2),
        ((2, 3, 17, 4), 2, 4, 4),
        ((2, 3, 17, 4), 2, 3, 5),
        ((9, 4), 0, 4, 2),
        ((20, 3), 0, 1, 1),
    ],
)
def test_unfold_matches_tensor_unfold_and_its_gradient(shape, dim, size, step) -> None:
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.equal(unfold(x, dim, size, step), x.unfold(dim, size, step))
    assert torch.autograd.gradcheck(lambda t: unfold(t, dim, size, step), (x,))


def _backward_nodes(name: str, seq_len: int) -> list[str]:
    module = get(name).build(seq_len=seq_len, heads=2, head_dim=16)
    q, k, v = (torch.randn(1, 2, seq_len, 16, requires_grad=True) for _ in range(3))
    names, stack, seen = [], [module(q, k, v).grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("name", ["local", "sparse", "reformer"])
def test_a_training_step_has_no_slice_gradient_per_block(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blockwise mechanisms' backward has no whole-input slice gradient per block (``SliceBackward0``,
    ``IndexSelectBackward0``: an O(n) zero fill each, O(n^2 / block) in all), but one chunked node: as many
    such nodes at 4096 tokens as at 1024, with small blocks (several per length)."""
    monkeypatch.setattr("attention_impls.blocks.CHUNK_ELEMENTS", 1 << 12)
    monkeypatch.setattr("attention_impls.reformer.BLOCK_SLOTS", 256)
    short, long = _backward_nodes(name, 1024), _backward_nodes(name, 4096)
    assert short.count("_ChunkedBackward") == long.count("_ChunkedBackward") == 1, long
    for kind in ("SliceBackward0", "IndexSelectBackward0"):
        assert short.count(kind) == long.count(kind), (kind, short.count(kind), long.count(kind))


def test_a_part_passed_through_leaves_the_incoming_gradient_alone() -> None:
    """A chunk that returns its whole part unchanged gets the incoming gradient itself as the part's gradient:
    adding the other chunks into it would change what they read."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    reads = [(Span(0, 0, 4),), (Span(0, 0, 4),)]
    (out,) = chunked(lambda number, a: (a if number == 0 else 2 * a,), reads, x)
    weights = torch.randn(8, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, x, weights)
    torch.testing.assert_close(grad, weights[:4] + 2 * weights[4:], rtol=0, atol=1e-15)
    (expanded,) = torch.autograd.grad(chunked(lambda number, a: (a,), reads, x)[0].sum(), x)
    torch.testing.assert_close(expanded, torch.full_like(x, 2.0))
