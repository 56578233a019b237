"""Training step over forward, measured in one process, the two alternated: python interleaved.py [N] [ROUNDS].

CPU float32, batch 1, 8 heads x 64, every approximate mechanism at its defaults. Each round times one forward
(no autograd) and one training step (forward, backward of the sum; gradients of q, k, v and the module's
parameters) of each mechanism; each figure is the best of the rounds. Prints one JSON line per mechanism.
Run it against two checkouts (PYTHONPATH=...) in alternation to compare code versions on a drifting machine.
"""

import json
import sys
import time

import torch

from attention_impls import get

seq_len = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
torch.manual_seed(0)
cases = {}
for name in ("local", "sparse", "linear", "linformer", "reformer"):
    module = get(name).build(seq_len=seq_len, heads=8, head_dim=64)
    q, k, v = (torch.randn(1, 8, seq_len, 64, requires_grad=True) for _ in range(3))
    cases[name] = (module, (q, k, v))


def forward(module, qkv):
    with torch.no_grad():
        module(*qkv)


def step(module, qkv):
    for leaf in (*qkv, *module.parameters()):
        leaf.grad = None
    module(*qkv).sum().backward()


best = {name: {"fwd_s": float("inf"), "fwd+bwd_s": float("inf")} for name in cases}
for module, qkv in cases.values():  # warm-up
    forward(module, qkv)
    step(module, qkv)
for _ in range(rounds):
    for name, (module, qkv) in cases.items():
        for label, fn in (("fwd_s", forward), ("fwd+bwd_s", step)):
            start = time.perf_counter()
            fn(module, qkv)
            best[name][label] = min(best[name][label], time.perf_counter() - start)
for name, times in best.items():
    print(json.dumps({"impl": name, "seq_len": seq_len, **times, "ratio": times["fwd+bwd_s"] / times["fwd_s"]}))
