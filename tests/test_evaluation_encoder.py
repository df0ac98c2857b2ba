"""The sentence encoder and its frozen cosine heads (evaluation/encoder.py), on a tiny random BERT."""

from __future__ import annotations

import pytest
import torch

from tiesmerge.evaluation.encoder import LOGIT_SCALE, build_head, mean_pool

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]],
                           [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]],
                           [[-2.0, 0.0], [50.0, 50.0], [50.0, 50.0]]])  # (3, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    expected = torch.tensor([[2.0, 3.0], [7.0, 8.0], [-2.0, 0.0]])
    assert torch.equal(mean_pool(hidden, mask), expected)


def test_encode_returns_unit_vectors_in_input_order(encoder):
    # lengths deliberately unsorted, so the length-sorted batches must be scattered back
    texts = ["the cat sat on a mat far away", "dog", "bird sang a song", "a small red house by the river",
             "sun", "moon and star at night", "cold rain", "the big old tree is green"]
    batched = encoder.encode(texts, batch_size=3)
    assert batched.shape == (len(texts), 32)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)
    single = torch.cat([encoder.encode([t]) for t in texts])
    assert torch.allclose(batched, single, atol=1e-5)
    # the rows are distinct, so a permutation would be caught
    cos = batched @ batched.T
    assert (cos - torch.eye(len(texts))).max() < 0.9999


def test_encode_restores_training_mode(encoder):
    encoder.train()
    try:
        encoder.encode(["the cat"])
        assert encoder.training
    finally:
        encoder.eval()
    encoder.encode(["the cat"])
    assert not encoder.training


def test_cosine_head_is_scaled_cosine(encoder):
    descriptions = ["a cat", "a dog", "a bird sang"]
    head = build_head(encoder, descriptions, scale=7.0)
    assert head.scale == 7.0
    assert torch.allclose(head.class_embeddings, encoder.encode(descriptions), atol=1e-6)
    queries = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    queries = torch.nn.functional.normalize(queries, dim=-1)
    cosine = torch.nn.functional.cosine_similarity(queries[:, None, :], head.class_embeddings[None, :, :], dim=-1)
    assert torch.allclose(head.logits(queries), 7.0 * cosine, atol=1e-5)
    assert build_head(encoder, descriptions).scale == LOGIT_SCALE
