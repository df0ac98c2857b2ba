"""DELLA and DELLA-linear (methods/della.py): MagPrune's keep probabilities against a float64
reference, the rescale of the kept entries, the drop rates by rank, density 1 as TIES / a sum,
and the seeded, reproducible draws."""

from __future__ import annotations

import pytest
import torch

from helpers_merge import assert_matches, grid_family, ref_linear, ref_ties, run
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Della, DellaLinear
from tiesmerge.methods.della import keep_probabilities


def ref_probabilities(row: list[float], density: float, epsilon: float) -> list[float]:
    """Entry i of a row of distinct magnitudes: density - eps + 2 eps (rank_i - 1) / (m - 1)."""
    m = len(row)
    order = sorted(range(m), key=lambda i: abs(row[i]))
    rank = {i: r for r, i in enumerate(order)}
    return [density - epsilon + 2 * epsilon * rank[i] / (m - 1) for i in range(m)]


def test_keep_probabilities_rank_each_row() -> None:
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(6, 9, generator=g)
    probs = keep_probabilities(tau, 0.4, 0.1)
    for r in range(6):
        want = ref_probabilities(tau[r].tolist(), 0.4, 0.1)
        torch.testing.assert_close(probs[r].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    vector = torch.randn(11, generator=g)  # a 1-D tensor is one row
    torch.testing.assert_close(keep_probabilities(vector, 0.5, 0.2).double(),
                               torch.tensor(ref_probabilities(vector.tolist(), 0.5, 0.2), dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)
    assert float(keep_probabilities(torch.tensor([3.0]), 0.5, 0.2)) == pytest.approx(0.5)  # one entry: density
    assert float(keep_probabilities(torch.tensor(2.0), 0.5, 0.2)) == pytest.approx(0.5)  # 0-d


def test_density_one_is_untrimmed_ties_and_task_arithmetic() -> None:
    base, models = grid_family(31, 3)
    weights = (1.0, 0.6, 0.4)
    for aggregate in ("mean", "sum"):
        assert_matches(run(base, models, Della(density=1.0, lam=1.1, weights=weights, aggregate=aggregate,
                                                zero_sign="zero")),
                       ref_ties(base, models, lam=1.1, weights=weights, aggregate=aggregate, trim=False))
    assert_matches(run(base, models, DellaLinear(density=1.0, lam=0.7, weights=weights)),
                   ref_linear(base, models, lam=0.7, weights=weights))


def _ranked_family(rows: int = 4000, m: int = 5) -> tuple[dict, list[dict]]:
    """One model whose every row holds the magnitudes 1..m: rank r's keep rate is one number."""
    base = {"w": torch.zeros(rows, m)}
    values = torch.arange(1, m + 1, dtype=torch.float32).repeat(rows, 1)
    return base, [{"w": values}]


def test_magprune_keeps_by_rank_and_rescales_by_inverse_probability() -> None:
    base, models = _ranked_family()
    density, epsilon = 0.5, 0.2
    out = run(base, models, DellaLinear(density=density, epsilon=epsilon, seed=4))["w"]  # (rows, 5)
    want_p = [density - epsilon + 2 * epsilon * r / 4 for r in range(5)]  # 0.3 .. 0.7
    for r in range(5):
        kept = out[:, r] != 0
        rate = float(kept.double().mean())
        sd = (want_p[r] * (1 - want_p[r]) / out.shape[0]) ** 0.5
        assert abs(rate - want_p[r]) < 5 * sd, (r, rate, want_p[r])
        torch.testing.assert_close(out[kept, r].double(), torch.full((int(kept.sum()),), (r + 1) / want_p[r],
                                                                      dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_l1_rescale_and_no_rescale() -> None:
    base, models = _ranked_family(200)
    tau = models[0]["w"]
    l1 = run(base, models, DellaLinear(density=0.5, epsilon=0.1, rescale="l1", seed=1))["w"]
    assert float(l1.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    plain = run(base, models, DellaLinear(density=0.5, epsilon=0.1, rescale="none", seed=1))["w"]
    kept = plain != 0
    assert torch.equal(plain[kept], tau[kept]) and torch.equal(kept, l1 != 0)  # same draws, other rescale


def test_draws_are_seeded_and_independent_per_model() -> None:
    base, models = grid_family(32, 3, coarse=False)
    a = run(base, models, "della", density=0.5, seed=7)
    b = run(base, models, "della", density=0.5, seed=7)
    c = run(base, models, "della", density=0.5, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    twin = {"w": torch.zeros(300, 10)}
    same = [{"w": torch.ones(300, 10)}, {"w": torch.ones(300, 10)}]
    out = run(twin, same, DellaLinear(density=0.5, epsilon=0.0, rescale="none", seed=2))["w"]
    both = float((out == 2).double().mean())
    assert abs(both - 0.25) < 0.03  # independent masks; one shared mask would give 0.5


def test_della_checks_its_probabilities() -> None:
    with pytest.raises(ConfigError, match="epsilon"):
        Della(density=0.9, epsilon=0.15)
    with pytest.raises(ConfigError, match="epsilon"):
        DellaLinear(density=0.1, epsilon=0.1)
    DellaLinear(density=1.0, epsilon=0.15)  # density 1 draws nothing
    with pytest.raises(ConfigError, match="rescale"):
        Della(rescale="l2")


def test_the_planner_budgets_dellas_torch_path_as_measured_not_as_ten_temporaries() -> None:
    """DELLA's random drop (density < 1) runs on the torch path: 8 float32 models of a 30522 x 384
    embedding measured 1.79 GiB above the inputs (the MiniLM benchmark); the plan once said 4.82 GiB
    (the elementwise default of 10 (n, E) temporaries). Now: 3 temporaries plus MagPrune's workspace."""
    import tiesmerge

    zero = torch.zeros(1, 384).expand(30522, 384)
    base, models = {"emb": zero}, [{"emb": zero} for _ in range(8)]
    for method in (Della(density=0.5, epsilon=0.15), DellaLinear(density=0.5, epsilon=0.15)):
        peak = tiesmerge.plan_merge(base, models, method, memory_budget="64GiB").peak_bytes / 2**30
        assert 1.8 < peak < 3.5, (method, peak)
