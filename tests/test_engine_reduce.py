"""Reductions over a scope (engine/reduce.py): each model's exact top-k threshold of |tau|, streamed
over chunks (with and without a sampled bracket) and in memory, for raw rows and task vectors,
against a sort; sums over chunks against one sum; the statistics' RMS scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_ckpt import write_hf_dir
from tiesmerge.engine import fused
from tiesmerge.engine import reduce as reduce_mod
from tiesmerge.engine.plan import make_plan
from tiesmerge.engine.reader import EngineInputs, Reader
from tiesmerge.engine.reduce import Reducer, rms_scales
from tiesmerge.errors import InvalidTensorError
from tiesmerge.io.align import align
from tiesmerge.io.checkpoint import open_checkpoint
from tiesmerge.methods.base import ChunkContext, Reduction, TopK

State = dict[str, torch.Tensor]
SHAPES = {"a": (40, 30), "b": (200,), "c": (16, 8, 3), "s": ()}
N = 3
TOPS = {
    "5%": TopK(0.05),
    "30%": TopK(0.3),
    "all": TopK(1.0),
    "none": TopK(1e-4),  # keeps 0 entries of every scope here: +inf
    "per model": TopK(0.2, densities=(0.01, 0.5, 1.0)),
}
RAW = [False, pytest.param(True, marks=pytest.mark.skipif(not fused.available(), reason="needs the fused kernels"))]


def family(dtype: torch.dtype, ties: bool) -> tuple[State, list[State]]:
    """A base and N models; ``ties``: task vectors on a coarse dyadic grid (many equal |tau|, zeros)."""
    g = torch.Generator().manual_seed(3)
    base = {k: (torch.randint(-64, 65, s, generator=g) / 16).to(dtype) for k, s in SHAPES.items()}
    models = []
    for _ in range(N):
        if ties:
            models.append({k: (v.float() + torch.randint(-8, 9, v.shape, generator=g) / 8).to(dtype)
                           for k, v in base.items()})
        else:
            models.append({k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()})
    return base, models


@pytest.fixture()
def reducer_of(tmp_path):
    """(reducer, alignment) over a family written as HF directories; closes the files afterwards."""
    ckpts = []

    def make(base: State, models: list[State], raw: bool):
        b = open_checkpoint(write_hf_dir(tmp_path / "base", base))
        ms = [open_checkpoint(write_hf_dir(tmp_path / f"m{k}", m, shards=2)) for k, m in enumerate(models)]
        ckpts.extend([b, *ms])
        return Reducer(Reader(EngineInputs(b, tuple(ms)), raw=raw)), align(b, ms)

    yield make
    for c in ckpts:
        c.close()


def chunks(alignment, budget: int, names: list[str] | None = None) -> list:
    plan = make_plan(alignment, N, memory_budget=budget, out_dtype=None)
    return [c for j in alignment.jobs if j.merge and (names is None or j.name in names)
            for c in plan.chunks_by_job[j.name]]


def sorted_thresholds(base: State, models: list[State], names: list[str], top: TopK) -> np.ndarray:
    """Each model's keep-th largest float32 |tau| over ``names``, by sorting (+inf keeping nothing)."""
    numel = sum(base[k].numel() for k in names)
    keep = top.keep_counts(numel, len(models))
    out = []
    for m, k in zip(models, keep, strict=True):
        mags = torch.cat([(m[n].float() - base[n].float()).reshape(-1) for n in names]).abs()
        out.append(np.inf if k == 0 else float(mags.sort(descending=True).values[k - 1]))
    return np.array(out, np.float32)


@pytest.mark.parametrize("raw", RAW)
@pytest.mark.parametrize("bracket", [False, True], ids=["radix", "sampled-bracket"])
@pytest.mark.parametrize(("ties", "dtype"), [(False, torch.float32), (True, torch.bfloat16)],
                         ids=["continuous-f32", "ties-bf16"])
def test_streamed_thresholds_are_the_sorted_kth_largest(reducer_of, monkeypatch, raw, bracket, ties, dtype):
    if bracket:  # every scope is "large": a bracket is estimated from the sample first
        monkeypatch.setattr(reduce_mod, "SAMPLED_NUMEL", 0)
    base, models = family(dtype, ties)
    reducer, alignment = reducer_of(base, models, raw)
    numel = sum(v.numel() for v in base.values())
    for name, top in TOPS.items():
        got = reducer.thresholds(chunks(alignment, 1024), numel, top)  # one row per chunk
        want = sorted_thresholds(base, models, list(SHAPES), top)
        assert got.dtype == np.float32 and np.array_equal(got, want), (name, got, want)
        assert reducer.passes <= 3


@pytest.mark.parametrize("raw", RAW)
@pytest.mark.parametrize("bracket", [False, True], ids=["radix", "sampled-bracket"])
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_in_memory_thresholds_equal_streamed_and_sorted(reducer_of, monkeypatch, raw, bracket, ties):
    if bracket:  # tensors of 256 entries or more get a bracket sampled in memory
        monkeypatch.setattr(reduce_mod, "MEMORY_SAMPLE_RUNS", 4)
        monkeypatch.setattr(reduce_mod, "MEMORY_SAMPLE_RUN", 16)
    base, models = family(torch.bfloat16, ties)
    reducer, alignment = reducer_of(base, models, raw)
    for job in (j for j in alignment.jobs if j.merge):
        (whole,) = chunks(alignment, 1 << 30, [job.name])
        payload = reducer.reader.read(whole)  # raw rows sit in a read slot: used before the next read
        rows = None if raw else reducer.reader.task_vectors(whole, payload)
        in_memory = {name: reducer.thresholds_in_memory(whole, payload, rows, top) for name, top in TOPS.items()}
        for name, top in TOPS.items():
            streamed = reducer.thresholds(chunks(alignment, 1024, [job.name]), job.numel, top)
            want = sorted_thresholds(base, models, [job.name], top)
            assert np.array_equal(in_memory[name], want), (job.name, name, in_memory[name], want)
            assert np.array_equal(streamed, want), (job.name, name, streamed, want)


def test_the_fixture_keeps_nothing_and_everything_where_it_says() -> None:
    """The densities above mean what their names say on these scopes."""
    numel = sum(int(np.prod(s)) for s in SHAPES.values())
    assert TOPS["none"].keep_counts(numel, N) == [0, 0, 0]
    assert TOPS["all"].keep_counts(numel, N) == [numel] * N
    assert TOPS["per model"].keep_counts(numel, N) == [numel // 100, numel // 2, numel]


# ---------------------------------------------------------------------------------------------- sums


def _rows_total(tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
    return tau.reshape(tau.shape[0], -1).double().sum(1)  # (n,)


REDUCTIONS = (
    Reduction("scratch", lambda tau, ctx: tau.mul_(0).sum()),  # writes into its tau: a copy, not the others'
    Reduction("total", _rows_total),
    Reduction("sign", lambda tau, ctx: tau.double().sum(), torch.sign),
)


@pytest.mark.parametrize("raw", [False, True])
def test_sums_over_chunks_equal_one_sum(reducer_of, raw):
    base, models = family(torch.float32, ties=True)  # dyadic values: every sum is exact
    reducer, alignment = reducer_of(base, models, raw)
    seen = []

    def context(chunk, rows) -> ChunkContext:
        seen.append((chunk.job.name, chunk.offset))
        return ChunkContext(name=chunk.job.name, offset=chunk.offset)

    streamed = reducer.sums(chunks(alignment, 1024), REDUCTIONS, context)
    assert reducer.passes == 1 and len(seen) == len(chunks(alignment, 1024)) > len(SHAPES)
    whole = reducer.sums(chunks(alignment, 1 << 30), REDUCTIONS, context)
    total = torch.tensor([sum(float((m[k].double() - base[k].double()).sum()) for k in SHAPES) for m in models])
    for result in (streamed, whole):
        assert set(result) == {"scratch", "total", "sign"}
        assert torch.equal(result["scratch"], torch.tensor(0.0))
        assert result["total"].dtype == torch.float32 and torch.equal(result["total"], total.float())
        assert torch.equal(result["sign"], torch.sign(total.sum()).float())
    assert float(total.abs().min()) > 0  # so a dropped chunk would show


def test_sums_of_an_empty_scope_are_zero(reducer_of):
    base, models = family(torch.float32, ties=True)
    reducer, _ = reducer_of(base, models, False)
    result = reducer.sums([], REDUCTIONS, lambda chunk, rows: ChunkContext())
    assert {k: float(v) for k, v in result.items()} == {"scratch": 0.0, "total": 0.0, "sign": 0.0}


# ---------------------------------------------------------------------------------------------- rms_scales


def test_rms_scales_are_one_over_each_models_root_mean_square() -> None:
    first = open_checkpoint({"w": torch.full((2, 3), 2.0), "stored.v": torch.full((2,), 2.0)}, label="s0")
    second = open_checkpoint({"w": torch.tensor([[3.0, 4.0], [0.0, 0.0]])}, label="s1")  # mean square 25 / 4
    names = [{"w": "w", "v": "stored.v"}, {"w": "w"}]
    assert rms_scales("fisher", [first, second], names) == pytest.approx([0.5, 0.4])
    zero = open_checkpoint({"w": torch.zeros(3)}, label="s2")
    with pytest.raises(InvalidTensorError, match="s2: every fisher value is 0, so it cannot be normalized"):
        rms_scales("fisher", [first, zero], [{"w": "w"}, {"w": "w"}])
