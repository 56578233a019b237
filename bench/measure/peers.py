"""Side by side with the most used public PyTorch implementation of each algorithm, in one run.

Peers (PyPI, installed by ``nox -s peers``; not dependencies of attnbench):

| ours        | peer                                                            |
| ----------- | --------------------------------------------------------------- |
| `local`     | `local-attention`: ``LocalAttention(exact_windowsize=True)``    |
| `linformer` | `linformer`: ``LinformerSelfAttention`` (with its projections)  |
| `reformer`  | `reformer-pytorch`: ``LSHAttention``                            |
| `linear`    | `linear-attention-transformer`: ``linear_attn``, ``causal_linear_attn`` |
| `performer` | `performer-pytorch`: ``FastAttention`` (FAVOR+)                   |
| `nystrom`   | `nystrom-attention`: ``NystromAttention(residual=False)``, identity projections |

Same shapes, dtype, threads and hyperparameters (window, projected length,
bucket size and hash rounds, random features, landmarks and pseudo-inverse
steps), in two modes: ``fwd`` (without autograd) and
``fwd+bwd`` (a training step: the forward, then the backward of its sum, with
gradients for q, k and v, or for the input and every projection). Both sides
of a pair are timed in alternation, ``--rounds`` times, and the medians of all
their samples are compared. Linformer's peer includes the q/k/v/output
projections, so ours is wrapped in the same four ``nn.Linear`` for that pair;
Nyströmformer's projections are made identities instead (they would be most
of its time). Performer's causal peer is not timed: its CPU path keeps a
(features x head_dim) sum per position and took 30 s a training step at 8192
tokens, 40 times ours.
The peers of ``linear`` use a softmax feature map (ours: elu+1, the paper's;
a second row runs ours with its softmax feature map) and the causal one skips
its own bucket: same O(n d^2) algorithm, not the same function; the table
says so. Both sides share the process's C allocator: with glibc's defaults a
temporary of 32 MiB or more is mapped and page-faulted afresh on every call
(the table names the setting; ``MALLOC_*`` variables raised compare the
arithmetic alone).

Run: ``nox -s peers`` (or ``python -m bench.measure.peers --seq-lens 8192,16384 --modes fwd,fwd+bwd``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from attention_impls import get
from bench.measure.process import allocator_setting
from bench.measure.timing import time_callable

BATCH, HEADS, HEAD_DIM = 1, 8, 64
D_MODEL = HEADS * HEAD_DIM


MODES = ("fwd", "fwd+bwd")
# a side of a pair, built for a length: (the call, the tensors a training step takes gradients of)
Side = Callable[[int], tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]


@dataclasses.dataclass
class Pair:
    label: str
    ours: Side
    peer: Side
    note: str = ""


def _qkv(seq_len: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(BATCH, HEADS, seq_len, HEAD_DIM) for _ in range(3)]


def _ours(name: str, *, causal: bool = False, **params) -> Side:
    def make(seq_len: int):
        module = get(name, params).build(seq_len=seq_len, heads=HEADS, head_dim=HEAD_DIM)
        q, k, v = _qkv(seq_len)
        return (lambda: module(q, k, v, causal=causal)), [q, k, v, *module.parameters()]

    return make


def _local_peer(window: int) -> Side:
    def make(seq_len: int):
        from local_attention import LocalAttention

        attn = LocalAttention(
            window_size=window,
            causal=False,
            look_backward=1,
            look_forward=1,
            exact_windowsize=True,
            autopad=True,
            use_rotary_pos_emb=False,
        )
        q, k, v = _qkv(seq_len)
        return (lambda: attn(q, k, v)), [q, k, v]

    return make


def _reformer_peer(bucket_size: int, n_hashes: int) -> Side:
    def make(seq_len: int):
        from reformer_pytorch.reformer_pytorch import LSHAttention

        attn = LSHAttention(bucket_size=bucket_size, n_hashes=n_hashes, causal=False).eval()
        q, _, v = _qkv(seq_len)
        qk = q.reshape(BATCH * HEADS, seq_len, HEAD_DIM)  # (batch * heads, seq_len, head_dim)
        vv = v.reshape(BATCH * HEADS, seq_len, HEAD_DIM)
        return (lambda: attn(qk, vv)[0]), [qk, vv]

    return make


def _linear_peer(*, causal: bool) -> Side:
    def make(seq_len: int):
        from linear_attention_transformer.linear_attention_transformer import causal_linear_attn, linear_attn

        q, k, v = _qkv(seq_len)
        if causal:
            return (lambda: causal_linear_attn(q, k, v, bucket_size=64)), [q, k, v]
        return (lambda: linear_attn(q, k, v)), [q, k, v]

    return make


def _performer_peer(features: int) -> Side:
    def make(seq_len: int):
        from performer_pytorch import FastAttention

        torch.manual_seed(0)
        attn = FastAttention(dim_heads=HEAD_DIM, nb_features=features)
        q, k, v = _qkv(seq_len)
        return (lambda: attn(q, k, v)), [q, k, v]

    return make


class _Projected(nn.Module):
    """Our attention between the same q/k/v and output projections LinformerSelfAttention has."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.to_q = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.to_k = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.to_v = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.to_out = nn.Linear(D_MODEL, D_MODEL)
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq_len, HEADS, HEAD_DIM).transpose(1, 2)  # (batch, heads, seq_len, head_dim)

        out = self.attention(heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x)))
        return self.to_out(out.transpose(1, 2).reshape(batch, seq_len, D_MODEL))  # (batch, seq_len, d_model)


def _projected_ours(name: str, **params) -> Side:
    def make(seq_len: int):
        torch.manual_seed(0)
        module = _Projected(get(name, params).build(seq_len=seq_len, heads=HEADS, head_dim=HEAD_DIM))
        x = torch.randn(BATCH, seq_len, D_MODEL)
        return (lambda: module(x)), [x, *module.parameters()]

    return make


def _linformer_peer(k: int) -> Side:
    def make(seq_len: int):
        from linformer import LinformerSelfAttention

        torch.manual_seed(0)
        module = LinformerSelfAttention(dim=D_MODEL, seq_len=seq_len, k=k, heads=HEADS, share_kv=False)
        x = torch.randn(BATCH, seq_len, D_MODEL)
        return (lambda: module(x)), [x, *module.parameters()]

    return make


def _nystrom_peer(landmarks: int, iterations: int) -> Side:
    """NystromAttention without its convolution, its projections made identities: it takes q, k and v side by
    side as its input, (batch, seq_len, 3 x heads x head_dim), and hands the heads' output on as they are."""

    def make(seq_len: int):
        from nystrom_attention import NystromAttention

        module = NystromAttention(
            dim=D_MODEL,
            dim_head=HEAD_DIM,
            heads=HEADS,
            num_landmarks=landmarks,
            pinv_iterations=iterations,
            residual=False,
        )
        module.to_qkv, module.to_out = nn.Identity(), nn.Identity()
        q, k, v = _qkv(seq_len)
        x = torch.cat([t.transpose(1, 2).reshape(BATCH, seq_len, D_MODEL) for t in (q, k, v)], dim=-1)
        return (lambda: module(x)), [x]

    return make


def mechanism(pair: Pair) -> str:
    """The registered implementation a pair times: its label's first word (what --pairs names)."""
    return pair.label.split(" ")[0].rstrip(",")


def pairs() -> list[Pair]:
    window = get("local").config.window
    reformer = get("reformer").config
    linformer_k = get("linformer").config.k
    features = get("performer").config.features
    nystrom = get("nystrom").config
    return [
        Pair(f"local (window {window})", _ours("local", window=window), _local_peer(window)),
        Pair(
            f"linformer (k {linformer_k}, with projections)",
            _projected_ours("linformer", k=linformer_k),
            _linformer_peer(linformer_k),
        ),
        Pair(
            f"reformer (bucket {reformer.bucket_size}, {reformer.n_hashes} hashes)",
            _ours("reformer"),
            _reformer_peer(reformer.bucket_size, reformer.n_hashes),
        ),
        Pair("linear", _ours("linear"), _linear_peer(causal=False), "peer: softmax feature map; ours: elu+1"),
        Pair(
            "linear, softmax feature map",
            _ours("linear", feature_map="softmax"),
            _linear_peer(causal=False),
            "both softmax over head_dim for q; the peer's k: softmax over the sequence, no normalizer",
        ),
        Pair(
            "linear causal",
            _ours("linear", causal=True),
            _linear_peer(causal=True),
            "peer: softmax feature map, skips its own bucket",
        ),
        Pair(f"performer ({features} features)", _ours("performer"), _performer_peer(features)),
        Pair(
            f"nystrom ({nystrom.landmarks} landmarks, {nystrom.pinv_iterations} steps)",
            _ours("nystrom"),
            _nystrom_peer(nystrom.landmarks, nystrom.pinv_iterations),
            "peer: residual=False, its projections made identities",
        ),
    ]


def _timed(side: Side, seq_len: int, mode: str) -> Callable[[], object]:
    """The call a mode times: the forward without autograd, or a training step (forward, backward of the sum)."""
    call, leaves = side(seq_len)
    if mode == "fwd":

        def forward():
            with torch.no_grad():
                return call()

        return forward
    for leaf in leaves:
        leaf.requires_grad_(True)

    def step():
        for leaf in leaves:
            leaf.grad = None
        call().sum().backward()

    return step


def measure(pair: Pair, seq_len: int, mode: str, *, rounds: int, min_time_s: float, threads: int) -> dict:
    samples: dict[str, list[float]] = {"ours": [], "peer": []}
    fns = {"ours": _timed(pair.ours, seq_len, mode), "peer": _timed(pair.peer, seq_len, mode)}
    for _ in range(rounds):
        for side, fn in fns.items():
            stats = time_callable(fn, min_time_s=min_time_s, min_samples=3, num_threads=threads)
            samples[side].extend(stats.samples)
    ours_s, peer_s = statistics.median(samples["ours"]), statistics.median(samples["peer"])
    return {
        "pair": pair.label,
        "mode": mode,
        "seq_len": seq_len,
        "ours_median_s": ours_s,
        "peer_median_s": peer_s,
        "ours_over_peer": ours_s / peer_s,
        "note": pair.note,
        "n_samples": len(samples["ours"]),
    }


def markdown(rows: list[dict], *, threads: int, allocator: str) -> str:
    lines = [
        "# attnbench against public implementations",
        "",
        f"CPU, float32, batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, {threads} threads, torch "
        f"{torch.__version__}. `fwd`: the forward without autograd; `fwd+bwd`: a training step, the forward and "
        "the backward of its sum, with gradients for q, k and v (linformer: for the input and every projection). "
        "Medians of interleaved samples; `ours / peer` below 1 means attnbench is faster. Built by `nox -s peers`.",
        "",
        f"C allocator: {allocator}. Both sides share one process and its heap: with glibc's defaults a temporary "
        "of 32 MiB or more (float32, 8 heads of 64 at 16384 tokens: one q-sized tensor) is mapped afresh and "
        "page-faulted on every call, so the time of an implementation that makes such temporaries includes "
        "that; `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` set high compare the arithmetic alone.",
        "",
        "| mechanism | mode | seq_len | ours (ms) | peer (ms) | ours / peer | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['pair']} | {row['mode']} | {row['seq_len']} | {1e3 * row['ours_median_s']:.1f} | "
            f"{1e3 * row['peer_median_s']:.1f} | {row['ours_over_peer']:.2f} | {row['note']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="8192,16384")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.3)
    parser.add_argument("--pairs", default="", help="comma-separated mechanisms (e.g. performer,nystrom); default: all")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="reports/peers.md")
    parser.add_argument("--json", default="results/peers.json")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    chosen = pairs()
    if args.pairs:
        names = args.pairs.split(",")
        mechanisms = sorted({mechanism(pair) for pair in chosen})
        if unknown := sorted(set(names) - set(mechanisms)):
            parser.error(f"unknown pair {unknown[0]!r}; choose from {', '.join(mechanisms)}")
        chosen = [pair for pair in chosen if mechanism(pair) in names]
    torch.set_num_threads(args.threads)
    rows = []
    for pair in chosen:
        for mode in modes:
            for seq_len in (int(n) for n in args.seq_lens.split(",")):
                row = measure(pair, seq_len, mode, rounds=args.rounds, min_time_s=args.min_time, threads=args.threads)
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    allocator = allocator_setting(os.environ)
    for row in rows:
        row["allocator"] = allocator
    text = markdown(rows, threads=args.threads, allocator=allocator)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
