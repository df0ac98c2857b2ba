"""The executor (engine/executor.py): chunked == in-memory for every method, buffers, passes,
bytes read against the plan, and the inputs it leaves alone."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import tiesmerge
from helpers_merge import clone_state, run
from tiesmerge.engine.executor import Executor, MemorySink
from tiesmerge.engine.reader import EngineInputs
from tiesmerge.io.align import align
from tiesmerge.io.checkpoint import StateDictCheckpoint
from tiesmerge.methods import DareLinear, DareTies, MagnitudePrune, Ties

State = dict[str, torch.Tensor]


TINY = 1024  # bytes: forces one-row chunks for every tensor below (either arithmetic path)


def family(seed: int = 0, n: int = 3, *, coarse: bool = False) -> tuple[State, list[State]]:
    """Tensors of several ranks and dtypes, large enough to be cut into many chunks at TINY."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "scalar": ((), torch.float32),
        "bias": ((37,), torch.float32),
        "weight": ((48, 24), torch.float32),
        "conv": ((9, 4, 5), torch.float64),
        "half": ((16, 8), torch.bfloat16),
    }
    base: State = {k: torch.randn(s, generator=g).to(d) for k, (s, d) in shapes.items()}
    base["position_ids"] = torch.arange(8, dtype=torch.int64)
    models = []
    for t in range(n):
        m: State = {}
        for k, (s, d) in shapes.items():
            tau = torch.randint(-3, 4, s, generator=g).double() / 4 if coarse else torch.randn(s, generator=g) * 0.1
            m[k] = (base[k].double() + tau + 0.02 * (t - 1)).to(d)  # a small bias per model: non-zero majority
        m["position_ids"] = torch.arange(8, dtype=torch.int64) * (t + 2)
        models.append(m)
    return base, models


def assert_same(a: State, b: State) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), (k, (a[k].double() - b[k].double()).abs().max())


METHODS = [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "zero_sign": "majority"}),
    ("ties", {"density": 0.3, "zero_sign": "positive", "elect": "count"}),
    ("ties", {"density": 0.3, "scope": "per_tensor"}),
    ("ties", {"density": 0.3, "scope": "per_tensor", "zero_sign": "majority"}),
    ("ties", {"density": 0.5, "scope": "per_tensor", "zero_sign": "majority", "elect": "count", "aggregate": "sum",
              "weights": [1.0, 0.5, 2.0]}),
    ("ties", {"density": 0.1, "aggregate": "max", "weights": [1.0, 0.5, 2.0], "zero_sign": "majority"}),
    ("magnitude_prune", {"density": 0.25}),
    ("magnitude_prune", {"density": 0.25, "scope": "per_tensor"}),
    ("task_arithmetic", {}),
    ("average", {"weights": [1.0, 2.0, 3.0]}),
    ("dare_linear", {"drop_rate": 0.7, "seed": 4}),
    ("dare_ties", {"drop_rate": 0.5, "seed": 9, "elect": "count"}),
]


@pytest.mark.parametrize("coarse", [False, True], ids=["continuous", "ties_in_values"])
@pytest.mark.parametrize(("method", "opts"), METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)])
def test_streamed_equals_in_memory(method: str, opts: dict, coarse: bool) -> None:
    base, models = family(1, coarse=coarse)
    plan = tiesmerge.plan_merge(base, models, method, memory_budget=TINY, **opts)
    assert len(plan.chunks_by_job["weight"]) == 48 and len(plan.chunks_by_job["conv"]) == 9  # one row each
    whole = tiesmerge.plan_merge(base, models, method, **opts)
    assert all(len(c) == 1 for c in whole.chunks_by_job.values())
    assert_same(run(base, models, method, memory_budget=TINY, **opts), run(base, models, method, **opts))


@pytest.mark.parametrize("budget", [TINY, 3 * TINY, 16 * TINY, 64 * TINY])
def test_every_budget_gives_the_same_global_ties_merge(budget: int) -> None:
    base, models = family(2)
    opts = {"density": 0.2, "zero_sign": "majority"}
    assert_same(run(base, models, "ties", memory_budget=budget, **opts), run(base, models, "ties", **opts))


def test_streamed_merge_changes_something() -> None:
    """Guard for the equality tests above: the merge is not the identity on these inputs."""
    base, models = family(1)
    for method, opts in METHODS:
        out = run(base, models, method, memory_budget=TINY, **opts)
        assert not torch.equal(out["weight"], base["weight"]), method


def test_dare_drops_do_not_depend_on_chunking_or_tensor_order() -> None:
    base, models = family(3)
    a = run(base, models, DareLinear(drop_rate=0.9, seed=1), memory_budget=TINY)
    reordered_base = dict(reversed(list(base.items())))
    reordered = [dict(reversed(list(m.items()))) for m in models]
    b = run(reordered_base, reordered, DareLinear(drop_rate=0.9, seed=1))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_buffers_are_copied_from_the_base_and_dtypes_kept() -> None:
    base, models = family(4)
    base["mask"] = torch.tensor([True, False])
    for m in models:
        m["mask"] = torch.tensor([False, True])
    out = run(base, models, "ties", memory_budget=TINY)
    assert torch.equal(out["position_ids"], base["position_ids"]) and out["position_ids"].dtype == torch.int64
    assert torch.equal(out["mask"], base["mask"])
    for k, v in base.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape


def test_zero_dim_tensor_merges() -> None:
    base = {"s": torch.tensor(1.0), "v": torch.zeros(3)}
    models = [{"s": torch.tensor(3.0), "v": torch.ones(3)}, {"s": torch.tensor(2.0), "v": torch.ones(3)}]
    for opts in ({"scope": "global"}, {"scope": "per_tensor"}, {"memory_budget": TINY}):
        out = run(base, models, "ties", density=1.0, **opts)
        assert out["s"].shape == () and float(out["s"]) == 2.5  # mean of the agreeing 2 and 1
    out = run(base, models, "task_arithmetic", lam=1.0)
    assert float(out["s"]) == 4.0


def test_empty_tensors_merge() -> None:
    base = {"e": torch.zeros(0, 4), "v": torch.zeros(3)}
    models = [{"e": torch.zeros(0, 4), "v": torch.ones(3)}]
    for method in ("ties", "dare_ties", "task_arithmetic"):
        for scope_opts in ({}, {"scope": "per_tensor"}) if method == "ties" else ({},):
            out = run(base, models, method, memory_budget=TINY, **scope_opts)
            assert out["e"].shape == (0, 4)


def test_output_dtype_option_casts_merged_tensors_only() -> None:
    base, models = family(5)
    out = run(base, models, "task_arithmetic", dtype=torch.bfloat16)
    ref = run(base, models, "task_arithmetic")
    assert out["weight"].dtype == torch.bfloat16 and out["position_ids"].dtype == torch.int64
    torch.testing.assert_close(out["weight"].float(), ref["weight"].float(), rtol=1e-2, atol=1e-2)


def test_tied_state_dict_tensors_share_one_output() -> None:
    g = torch.Generator().manual_seed(6)

    def tied(shift: float) -> State:
        emb = torch.randn(5, 3, generator=g) + shift
        return {"embed_tokens.weight": emb, "lm_head.weight": emb, "b": torch.randn(3, generator=g)}

    base, models = tied(0.0), [tied(1.0), tied(2.0)]
    out = tiesmerge.merge(base, models, "task_arithmetic")
    assert out["lm_head.weight"] is out["embed_tokens.weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("budget", [None, TINY])
def test_merge_leaves_the_base_and_models_unchanged(dtype: torch.dtype, budget: int | None) -> None:
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(6, 4, generator=g).to(dtype), "v": torch.randn(5, generator=g).to(dtype)}
    models = [{k: (v.float() + torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()} for _ in range(2)]
    before = [clone_state(base), *[clone_state(m) for m in models]]
    out = tiesmerge.merge(base, models, "task_arithmetic", lam=1.0, memory_budget=budget)
    for original, now in zip(before, [base, *models], strict=True):
        for k in original:
            assert torch.equal(original[k], now[k]), f"{k} of an input was modified in place"
    # and the result is not an alias of the base
    assert not torch.equal(out["w"], base["w"])


def test_merging_twice_gives_the_same_result() -> None:
    base, models = family(8)
    first = tiesmerge.merge(base, models, "ties", density=0.5)
    second = tiesmerge.merge(base, models, "ties", density=0.5)
    assert_same(first, second)


def _executor(base: State, models: list[State], method: Any, **kwargs: Any) -> Executor:
    b = StateDictCheckpoint(clone_state(base), "base")
    ms = [StateDictCheckpoint(clone_state(m), f"m{k}") for k, m in enumerate(models)]
    return Executor(EngineInputs(b, tuple(ms)), align(b, ms), method, **kwargs)


def _global_thresholds(base: State, models: list[State], density: float) -> list[float]:
    """m-th largest |float32 tau| over every floating tensor, per model (sorting, independently)."""
    out = []
    for m in models:
        taus = [(m[k].to(torch.float32) - base[k].to(torch.float32)).reshape(-1).abs()
                for k in base if base[k].is_floating_point()]
        flat = torch.cat(taus).double()
        keep = int(density * 10**6) * flat.numel() // 10**6
        out.append(math.inf if keep == 0 else float(flat.sort(descending=True).values[keep - 1]))
    return out


@pytest.mark.parametrize("budget", [TINY, 1 << 30])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.7, 1.0])
def test_executor_global_thresholds(budget: int, density: float) -> None:
    base, models = family(9)
    ex = _executor(base, models, Ties(density=density), memory_budget=budget)
    sink = MemorySink(ex.alignment.jobs, None)
    stats = ex.run(sink)
    assert stats.thresholds == _global_thresholds(base, models, density)
    merged = [k for k in base if base[k].is_floating_point()]
    assert stats.tensors_merged == len(merged) and stats.tensors_copied == 1


@pytest.mark.parametrize(
    "method",
    [Ties(density=0.3), Ties(density=0.3, zero_sign="majority"), Ties(scope="per_tensor", zero_sign="majority"),
     MagnitudePrune(scope="per_tensor"), DareTies(), Ties(scope="per_tensor")],
    ids=["ties", "ties-majority", "per_tensor-majority", "prune-per_tensor", "dare_ties", "per_tensor"],
)
@pytest.mark.parametrize("budget", [TINY, 1 << 30])
def test_bytes_read_match_the_plan(method: Any, budget: int) -> None:
    base, models = family(10)
    seen: list[int] = []
    ex = _executor(base, models, method, memory_budget=budget, progress=seen.append)
    stats = ex.run(MemorySink(ex.alignment.jobs, None))
    # the plan's passes are the most the selection takes; a bin holding one value ends it early
    assert stats.bytes_read == ex.plan.bytes_per_pass * stats.passes + stats.reduce_bytes + ex.plan.copy_bytes
    assert stats.passes <= ex.plan.passes and stats.reduce_bytes <= ex.plan.reduce_bytes
    assert sum(seen) == stats.bytes_read
