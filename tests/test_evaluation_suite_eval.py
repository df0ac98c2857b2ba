"""Suite accuracy (evaluation/suite_eval.py): per task, per suite, normalised by a reference."""

from __future__ import annotations

import math

import pytest

from tiesmerge.evaluation.encoder import CosineHead, build_head
from tiesmerge.evaluation.suite_eval import SuiteResult, evaluate_encoder, task_accuracy

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


TASK_A = ["the cat sat on a mat", "a dog ran far away", "bird sang a song", "the big old tree"]


TASK_B = ["cold rain at night", "warm sun on a day", "the moon and a star", "snow on a small house",
          "a fast river"]


def test_task_accuracy_perfect_with_self_heads_and_drops_when_permuted(encoder):
    examples = [(t, i) for i, t in enumerate(TASK_A)]
    head = build_head(encoder, TASK_A)
    assert task_accuracy(encoder, head, examples, batch_size=3) == 1.0
    derangement = [1, 2, 3, 0]  # no class keeps its own row
    permuted = CosineHead(head.class_embeddings[derangement], head.scale)
    assert task_accuracy(encoder, permuted, examples, batch_size=3) == 0.0
    # half the labels wrong -> 0.5
    half = [(t, (i + 1) % 4 if i % 2 else i) for i, t in enumerate(TASK_A)]
    assert task_accuracy(encoder, head, half) == 0.5
    with pytest.raises(ValueError):
        task_accuracy(encoder, head, [])


def test_evaluate_encoder_per_task(encoder):
    splits = {"a": [(t, i) for i, t in enumerate(TASK_A)], "b": [(t, i) for i, t in enumerate(TASK_B)]}
    heads = {"a": build_head(encoder, TASK_A), "b": build_head(encoder, TASK_B)}
    result = evaluate_encoder(encoder, splits, heads, batch_size=2)
    assert result.accuracy == {"a": 1.0, "b": 1.0}
    emb_b = heads["b"].class_embeddings
    heads["b"] = CosineHead(emb_b[[1, 2, 3, 4, 0]], heads["b"].scale)
    result = evaluate_encoder(encoder, splits, heads)
    assert result.accuracy == {"a": 1.0, "b": 0.0}
    assert result.mean == 0.5


def test_suite_result_arithmetic():
    r = SuiteResult({"a": 0.5, "b": 1.0, "c": 0.3})
    ref = SuiteResult({"a": 1.0, "b": 0.8, "c": 0.6})
    assert r.mean == pytest.approx(0.6)
    assert r.normalized(ref) == pytest.approx({"a": 0.5, "b": 1.25, "c": 0.5})
    assert r.normalized_mean(ref) == pytest.approx(0.75)
    assert r.normalized_mean(r) == pytest.approx(1.0)
    zero_ref = SuiteResult({"a": 0.0, "b": 0.8, "c": 0.6})
    assert math.isnan(r.normalized(zero_ref)["a"])
