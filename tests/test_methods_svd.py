"""The SVD helpers of the SVD methods (methods/svd.py): the float64 retry on an ill-conditioned
spectrum and on a float32 SVD that does not converge, the randomized SVD's error against the
full SVD, the polar factor, and the workspace estimate."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from tiesmerge.methods import svd as linalg


def _with_spectrum(m: int, n: int, spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An (m, n) float64 matrix with exactly these singular values (random orthonormal vectors)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, spectrum.numel(), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, spectrum.numel(), generator=g, dtype=torch.float64))
    return (u * spectrum) @ v.T


def _subspace_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """sin of the largest angle between the column spaces of a and b (orthonormal columns)."""
    return float(torch.linalg.matrix_norm(a.double() - b.double() @ (b.double().T @ a.double()), ord=2))


def test_an_ill_conditioned_spectrum_is_redone_in_float64(caplog) -> None:
    # singular values 1 .. 1e-9: float32 cannot resolve the small ones' vectors (eps * s_max = 1e-7)
    spectrum = torch.logspace(0, -9, 10, dtype=torch.float64)
    x64 = _with_spectrum(40, 30, spectrum)
    x = x64.float()
    u32, s32, _ = torch.linalg.svd(x, full_matrices=False)
    with caplog.at_level(logging.DEBUG, logger="tiesmerge.methods.svd"):
        u, s, vh = linalg.svd(x)
    assert "redone in float64" in caplog.text
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    exact = torch.linalg.svd(x.double(), full_matrices=False)  # the float32 input's own exact SVD
    # the 8th singular vector (s = 1e-7): float64 gets it to float32 rounding, float32 does not
    assert _subspace_error(u[:, 7:8], exact.U[:, 7:8]) < 1e-5
    assert _subspace_error(u32[:, 7:8], exact.U[:, 7:8]) > 1e-2
    # forcing float32 keeps float32's answer; a well-conditioned use of the same matrix stays in float32
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="tiesmerge.methods.svd"):
        torch.testing.assert_close(linalg.svd(x, precision="float32")[1], s32)
        linalg.svd(x, used=3)  # s_3 / s_1 = 1e-2: trustworthy
    assert "float64" not in caplog.text


def test_a_float32_svd_that_does_not_converge_is_redone_in_float64(monkeypatch) -> None:
    real = torch.linalg.svd
    calls = []

    def flaky(x, full_matrices=True):
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(x, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    u, s, vh = linalg.svd(x)
    assert calls == [torch.float32, torch.float64]
    torch.testing.assert_close((u * s) @ vh, x, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(torch.linalg, "svd", lambda x, full_matrices=True: (_ for _ in ()).throw(
        torch.linalg.LinAlgError("no convergence")))
    with pytest.raises(FloatingPointError, match=re.escape("'w' (6, 4) did not converge in float64")):
        linalg.svd(x, what="'w'")


def test_a_non_finite_float32_result_is_redone(monkeypatch) -> None:
    real = torch.linalg.svd

    def poisoned(x, full_matrices=True):
        u, s, vh = real(x, full_matrices=full_matrices)
        if x.dtype == torch.float32:
            s = s.clone()
            s[-1] = float("nan")
        return u, s, vh

    monkeypatch.setattr(torch.linalg, "svd", poisoned)
    _, s, _ = linalg.svd(torch.eye(3) * 2)
    assert bool(torch.isfinite(s).all())


def test_randomized_svd_error_against_the_full_svd() -> None:
    # an embedding-like matrix: a decaying spectrum (power law) plus noise
    m, n, k = 1000, 128, 16
    spectrum = torch.arange(1, n + 1, dtype=torch.float64) ** -1.0
    x = (_with_spectrum(m, n, spectrum, seed=3)).float()
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    best = float(torch.linalg.matrix_norm(x.double() - (u[:, :k] * s[:k]) @ vh[:k]))
    errors = {}
    for q in (0, 2):
        g = torch.Generator().manual_seed(0)
        ur, sr, vhr = linalg.randomized_svd(x, k, generator=g, power_iters=q)
        assert ur.shape == (m, k) and sr.shape == (k,) and vhr.shape == (k, n)
        errors[q] = float(torch.linalg.matrix_norm(x.double() - (ur.double() * sr.double()) @ vhr.double())) / best
    # the rank-k approximation is near the best (Eckart-Young); power iterations tighten it
    assert errors[2] < 1.02 and errors[0] < 1.5 and errors[2] <= errors[0]
    g = torch.Generator().manual_seed(0)
    _, sr, _ = linalg.randomized_svd(x, k, generator=g, power_iters=2)
    torch.testing.assert_close(sr.double(), s[:k], rtol=2e-2, atol=0)


def test_randomized_svd_is_seeded() -> None:
    x = torch.randn(200, 50, generator=torch.Generator().manual_seed(0))
    a = linalg.randomized_svd(x, 5, generator=torch.Generator().manual_seed(7), power_iters=0)
    b = linalg.randomized_svd(x, 5, generator=torch.Generator().manual_seed(7), power_iters=0)
    c = linalg.randomized_svd(x, 5, generator=torch.Generator().manual_seed(8), power_iters=0)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("shape", [(9, 4), (4, 9)])
def test_polar_is_the_nearest_orthonormal_matrix(shape) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    p = linalg.polar(x)
    small = min(shape)
    gram = p.T @ p if shape[0] >= shape[1] else p @ p.T
    torch.testing.assert_close(gram, torch.eye(small), rtol=1e-5, atol=1e-5)
    # nearer to x than another orthonormal matrix (the QR factor)
    q, _ = torch.linalg.qr(x if shape[0] >= shape[1] else x.T)
    q = q if shape[0] >= shape[1] else q.T
    assert float((x - p).norm()) <= float((x - q).norm()) + 1e-6


def test_svd_bytes_and_which_tensors_are_matrices() -> None:
    assert linalg.svd_bytes(1000, 100) > linalg.svd_bytes(100, 100) > 12 * 100 * 100
    assert linalg.matrix_shape((3, 4), "w", None) == (3, 4)
    assert linalg.matrix_shape((3,), "b", None) is None
    assert linalg.matrix_shape((3, 4, 5), "conv", None) is None
    assert linalg.matrix_shape((0, 4), "empty", None) is None
    assert linalg.matrix_shape((3, 4), "text_projection", re.compile("text_projection")) is None
    assert linalg.regex("a(") and linalg.regex(3) and linalg.regex("") is None and linalg.regex("embed") is None
