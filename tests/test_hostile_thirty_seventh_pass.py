"""Hostile pass 37 (issue 13), and the notes of pass 36 left for it."""

from __future__ import annotations

import pytest
import torch

import tiesmerge
from helpers_adapters import random_ia3, write_ia3_dir
from helpers_ckpt import make_base, write_hf_dir


def test_analyze_measures_ia3_adapters_on_their_scaling_vectors(tmp_path):
    """hp36 C60: analyze measured (IA)³ adapters in weight space (W·(l − 1): 6,144 parameters, sign conflicts of that),
    while `tiesmerge merge` trims, elects and averages l − 1 (192 entries): the report described another merge."""
    base = make_base(2)
    write_hf_dir(tmp_path / "base", base)
    vectors = [random_ia3(base, seed=k) for k in range(3)]
    dirs = [write_ia3_dir(tmp_path / f"ia3_{k}", v) for k, v in enumerate(vectors)]
    report = tiesmerge.analyze(tmp_path / "base", dirs, density=0.2)
    # the reference: the same analysis of τ = l − 1, fed as dense vectors against an all-ones base
    ones = {m: torch.ones_like(v) for m, v in vectors[0].items()}
    expected = tiesmerge.analyze(ones, [dict(v) for v in vectors], density=0.2)
    assert report["parameters"] == sum(v.numel() for v in vectors[0].values())
    assert report["kept_per_model"] == expected["kept_per_model"]
    assert report["thresholds"] == pytest.approx(expected["thresholds"])
    assert report["sign_conflicts"]["by_size"] == expected["sign_conflicts"]["by_size"]
    assert "scaling vectors" in report["inputs"]["measured"]
    assert report["summary"][0].startswith("Measured: (IA)³ scaling vectors")


def test_analyze_refuses_a_compared_merge_of_ia3_adapters(tmp_path):
    """A compared merge (--method) of (IA)³ adapters is written folded into the weights: its magnitudes would not be
    the quantities the statistics measure (l − 1)."""
    from tiesmerge.errors import ConfigError

    base = make_base(2)
    write_hf_dir(tmp_path / "base", base)
    dirs = [write_ia3_dir(tmp_path / f"ia3_{k}", random_ia3(base, seed=k)) for k in range(2)]
    with pytest.raises(ConfigError, match=r"--method with \(IA\)³ adapters"):
        tiesmerge.analyze(tmp_path / "base", dirs, methods=["ties"])
