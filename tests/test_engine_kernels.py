"""The fused CPU kernels compute exactly what the torch path computes (which the float64
reference in helpers_merge.py checks), for every TIES option, scope, dtype and chunking."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import tiesmerge
from tiesmerge.engine import kernels
from tiesmerge.engine.executor import Executor, RunStats
from tiesmerge.io.align import align
from tiesmerge.io.checkpoint import StateDictCheckpoint
from tiesmerge.methods import (
    Average,
    Breadcrumbs,
    BreadcrumbsTies,
    DareLinear,
    DareTies,
    Della,
    DellaLinear,
    MagnitudePrune,
    ModelStock,
    NuSlerp,
    Slerp,
    TaskArithmetic,
    Ties,
)

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


# ---------------------------------------------------------------- which path merged each chunk


@dataclass
class _Run:
    stats: RunStats
    merged_chunks: int  # chunks of merged tensors the executor handed to its sink


class _CountingSink:
    def __init__(self, inner, merged: set[str]) -> None:
        self.inner, self.merged, self.merged_chunks = inner, merged, 0

    def write(self, name, rows, chunk) -> None:
        self.merged_chunks += name in self.merged
        self.inner.write(name, rows, chunk)

    def alias(self, name, source) -> None:
        self.inner.alias(name, source)


@contextlib.contextmanager
def _watch():
    """Record every executor run (its RunStats and how many merged chunks it wrote) and every
    call of a kernel entry point, while merges run inside the block."""
    runs: list[_Run] = []
    calls: Counter[str] = Counter()
    real_run = Executor.run

    def run(self, sink):
        counting = _CountingSink(sink, {j.name for j in self.alignment.jobs if j.merge})
        stats = real_run(self, counting)
        runs.append(_Run(stats, counting.merged_chunks))
        return stats

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Executor, "run", run)
        for name in ("count_pass", "ties_merge", "linear_merge"):
            real = getattr(kernels, name)
            mp.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.update([_name]) or _real(*a))
        yield runs, calls


def _assert_fused(run: _Run) -> None:
    """Every merged chunk went through a fused kernel, none through the torch path."""
    assert run.merged_chunks > 0
    assert (run.stats.fused_chunks, run.stats.torch_chunks) == (run.merged_chunks, 0)


def _assert_torch(run: _Run) -> None:
    assert run.merged_chunks > 0
    assert (run.stats.fused_chunks, run.stats.torch_chunks) == (0, run.merged_chunks)


def _family(n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (97, 24), "w": (24, 40), "b": (40,), "norm": (24,), "scalar": ()}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    base["steps"] = torch.tensor([7], dtype=torch.int64)
    models = []
    for _ in range(n):
        m = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.3).to(dtype) if v.is_floating_point() else v
             for k, v in base.items()}
        # exact cancellations and exact ties, where sloppy kernels differ
        m["w"][0] = base["w"][0]
        models.append(m)
    models[0]["b"][:5] = (base["b"][:5].float() + 0.5).to(dtype)
    if n > 1:
        models[1]["b"][:5] = (base["b"][:5].float() - 0.5).to(dtype)
    return base, models


def _both(base, models, method, **kwargs):
    """The merge on the fused path and on the torch path, each with its executor run's record
    (the torch run is checked here: no kernel called, every chunk merged by torch)."""
    with _watch() as (runs, _):
        fused = tiesmerge.merge(base, models, method, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIESMERGE_KERNELS", "0")
        with _watch() as (plain_runs, plain_calls):
            plain = tiesmerge.merge(base, models, method, **kwargs)
    assert len(runs) == len(plain_runs) == 1
    assert not plain_calls
    _assert_torch(plain_runs[0])
    return fused, plain, runs[0]


FUSED_MERGES = [
    Ties(), Ties(scope="per_tensor"), Ties(density=0.7, elect="count"), Ties(zero_sign="positive"),
    Ties(aggregate="sum", lam=1.3), Ties(aggregate="max"), Ties(weights=(0.5, 2.0, 1.0)),
    Ties(weights=(-1.0, 1.0, 0.5), scope="per_tensor"), Ties(density=1.0), Ties(density=0.01),
    Ties(zero_sign="majority"), Ties(zero_sign="majority", scope="per_tensor"),  # per tensor: majority by torch
    Ties(threshold_ties="sort", scope="per_tensor"),  # mergekit's exact k: the sort's choice replayed (engine.exactk)
    Ties(threshold_ties="sort", scope="per_tensor", densities=(0.2, 0.3, 0.5), weights=(1.0, 0.7, 0.5),
         zero_sign="positive"),
    DareTies(drop_rate=0.5, seed=1), DareTies(drop_rate=0.9, seed=3, aggregate="sum", weights=(0.5, 1.0, -0.3)),
    DareTies(drop_rate=0.3, seed=2, elect="count", lam=1.7),
    TaskArithmetic(), TaskArithmetic(lam=0.7, weights=(0.5, -1.0, 2.0)), Average(), Average(weights=(1.0, 3.0, 0.5)),
    Average(weights=(0.3, 0.2, 0.7), base_weight=0.5),  # mergekit's linear: the models' own values, its order
    # mergekit's Breadcrumbs band (exact counts in torch.sort's order, engine.exactk.band_mask)
    Breadcrumbs(threshold_ties="sort", density=0.3, gamma=0.05, weights=(1.0, 0.7, 0.5)),
    Breadcrumbs(threshold_ties="sort", density=0.5, gamma=0.0, lam=1.3, weights=(1.0, 0.7, 0.5),
                normalize_weights=True),
    Breadcrumbs(threshold_ties="sort", density=0.2, gamma=0.3),
    BreadcrumbsTies(threshold_ties="sort", density=0.3, gamma=0.05, weights=(1.0, 0.7, 0.5), aggregate="mean"),
    BreadcrumbsTies(threshold_ties="sort", density=0.6, gamma=0.1, lam=0.9),
    # DELLA at density 1 (nothing dropped): mergekit's deterministic della / della_linear
    Della(density=1.0, weights=(1.0, 0.7, 0.5)),
    DellaLinear(density=1.0, weights=(0.5, 0.3, 0.2), normalize_weights=True),
]
# merged by the torch path even with the kernels on; only their thresholds are counted by a kernel
COUNTED_ONLY = [MagnitudePrune()]
# no kernel at all
TORCH_ONLY = [DareLinear(drop_rate=0.5, seed=1)]


@pytest.mark.parametrize("method", FUSED_MERGES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_equals_torch_path(method, dtype):
    base, models = _family(3, dtype)
    fused, plain, run = _both(base, models, method)
    _assert_fused(run)
    for name in plain:
        assert fused[name].dtype == plain[name].dtype
        assert torch.equal(fused[name], plain[name]), name
        if fused[name].is_floating_point():  # bit for bit: signed zeros too
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[fused[name].element_size()]
            assert torch.equal(fused[name].view(bits), plain[name].view(bits)), name


# whole-tensor interpolations: a reduction pass (torch's own sums of kernel-made products), one merge pass
WHOLE_TENSOR_MERGES = [
    (Slerp(anchor="base", t=0.3), 1), (Slerp(t=0.7), 2),
    (Slerp(anchor="base", t_by_name="w=0,0.5,1;b=1,0;*=0.25", layers=3), 1),
    (NuSlerp(weights=(0.7, 0.3)), 2), (NuSlerp(t=0.4, of="models"), 2), (NuSlerp(t=0.6, of="base_and_model"), 1),
    (ModelStock(), 3), (ModelStock(), 2),
]


def _assert_same_bits(fused, plain):
    for name in plain:
        assert fused[name].dtype == plain[name].dtype
        assert torch.equal(fused[name], plain[name]), name
        if fused[name].is_floating_point():  # bit for bit: signed zeros too
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[fused[name].element_size()]
            assert torch.equal(fused[name].view(bits), plain[name].view(bits)), name


@pytest.mark.parametrize(("method", "n"), WHOLE_TENSOR_MERGES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_tensor_kernels_equal_the_torch_path(method, n, dtype):
    base, models = _family(n, dtype)
    fused, plain, run = _both(base, models, method)
    _assert_fused(run)
    _assert_same_bits(fused, plain)


@pytest.mark.parametrize("method", [Slerp(t=0.3), NuSlerp(weights=(0.7, 0.3)), NuSlerp(t=0.2, of="models")],
                         ids=repr)
def test_whole_tensor_kernels_take_the_lerp_of_parallel_tensors(method):
    """(Anti)parallel endpoints: SLERP's |cos| > 0.9995 and NuSLERP's colinear branch (a lerp)."""
    base, models = _family(2, torch.float32)
    for name, value in base.items():
        if value.is_floating_point():
            models[1][name] = base[name] + 2.0 * (models[0][name] - base[name])  # tau_1 = 2 tau_0
            if method.name == "slerp" or method.of == "models":
                models[1][name] = 3.0 * models[0][name]
    fused, plain, run = _both(base, models, method)
    _assert_fused(run)
    _assert_same_bits(fused, plain)


@pytest.mark.parametrize(("method", "n"), [(Slerp(anchor="base", t=0.3), 1), (NuSlerp(weights=(0.7, 0.3)), 2),
                                         (ModelStock(), 3)], ids=repr)
def test_whole_tensor_kernels_on_a_tensor_of_several_mergekit_chunks(method, n):
    """2^21 + 12345 entries: SLERP sums 2^20-entry chunks, and torch's reductions split across threads."""
    g = torch.Generator().manual_seed(5)
    base = {"emb": torch.randn(2**21 + 12345, generator=g).bfloat16()}
    models = [{"emb": (base["emb"].float() + torch.randn(base["emb"].shape, generator=g) * 0.1).bfloat16()}
              for _ in range(n)]
    fused, plain, run = _both(base, models, method)
    _assert_fused(run)
    _assert_same_bits(fused, plain)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_torch_order_reductions_are_torchs_own_bits(threads):
    """The fused reductions (engine.whole.TorchOrder: ATen's 8-lane norm and cascade sum, split over
    torch's threads as at::parallel_for splits them) equal torch.linalg.vector_norm and torch.sum of
    the same float32 values, for lengths through every branch, at several thread counts."""
    from tiesmerge.engine import whole

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if not whole.torch_order_ok():
            pytest.skip("torch's reduction order is not the one TorchOrder replays on this build")
        g = torch.Generator().manual_seed(threads)
        for numel in (1, 7, 8, 9, 31, 33, 127, 1000, 4099, 32767, 32768, 32769, 98305, 3 * 2**20 + 11):
            rows = [torch.randn(numel, generator=g).bfloat16() for _ in range(3)]
            raw = [r.view(torch.int16).numpy().view(np.uint16) for r in rows]
            for relative in (False, True):
                x, y = (rows[i].float() - (rows[0].float() if relative else 0) for i in (1, 2))
                order = whole.TorchOrder(raw, (1, 2), relative)
                nx = torch.linalg.vector_norm(x.reshape(1, -1), dim=1)
                assert torch.equal(torch.from_numpy(order.norms(0)), nx), numel
                assert torch.equal(torch.from_numpy(order.sums(0, 1)), (x * y).sum().reshape(1)), numel
                assert torch.equal(torch.from_numpy(order.sums(0, 1, (float(nx), 0.7))),
                                   ((x / nx) * (y / torch.tensor(0.7))).sum().reshape(1)), numel
                span = 4099  # per span, as SLERP's 2^20-entry chunks
                spans = range(0, numel, span)
                assert torch.equal(torch.from_numpy(order.norms(1, span)), torch.stack(
                    [torch.linalg.vector_norm(y[s:s + span].reshape(1, -1), dim=1) for s in spans]).reshape(-1))
                assert torch.equal(torch.from_numpy(order.sums(0, 1, None, span)),
                                   torch.stack([(x[s:s + span] * y[s:s + span]).sum() for s in spans]))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("method", "n"), [(Slerp(anchor="base", t=0.3), 1), (NuSlerp(weights=(0.7, 0.3)), 2),
                                         (ModelStock(), 3)], ids=repr)
def test_whole_tensor_kernels_fall_back_to_torch_reductions_on_widened_copies(method, n, monkeypatch):
    """Where torch's order is not confirmed, the values are widened into buffers and reduced by torch
    (engine.whole.Materialised): the same bits again."""
    from tiesmerge.engine import whole

    g = torch.Generator().manual_seed(7)
    base = {"emb": torch.randn(2**20 + 4321, generator=g).bfloat16(), "w": torch.randn(33, 17, generator=g)}
    models = [{k: (v.float() + torch.randn(v.shape, generator=g) * 0.1).to(v.dtype) for k, v in base.items()}
              for _ in range(n)]
    fused_order = tiesmerge.merge(base, models, method)
    monkeypatch.setattr(whole, "torch_order_ok", lambda: False)
    fused, plain, run = _both(base, models, method)
    _assert_fused(run)
    _assert_same_bits(fused, plain)
    _assert_same_bits(fused_order, plain)


def test_whole_tensor_kernels_name_a_non_finite_model():
    base, models = _family(3, torch.float32)
    models[1]["w"][3, 4] = float("nan")
    with pytest.raises(tiesmerge.errors.InvalidTensorError, match="NaN"):
        tiesmerge.merge(base, models, ModelStock())


@pytest.mark.parametrize("method", COUNTED_ONLY, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_counting_kernel_thresholds_equal_the_torch_path(method, dtype):
    """Methods the kernels do not merge: the thresholds come from the counting kernel, the
    merge from torch; the result still equals the all-torch run bit for bit."""
    base, models = _family(3, dtype)
    with _watch() as (_, calls):
        fused, plain, run = _both(base, models, method)
    _assert_torch(run)
    assert calls["count_pass"] > 0 and calls["ties_merge"] == calls["linear_merge"] == 0
    for name in plain:
        assert torch.equal(fused[name], plain[name]), name


@pytest.mark.parametrize("method", TORCH_ONLY, ids=repr)
def test_what_the_kernels_do_not_cover_runs_on_torch_without_a_kernel_call(method):
    """Listed so that no fused-vs-torch test claims them: with the kernels on, still no kernel runs."""
    base, models = _family(3, torch.bfloat16)
    with _watch() as (runs, calls):
        tiesmerge.merge(base, models, method)
    _assert_torch(runs[0])
    assert not calls


@pytest.mark.parametrize("method", [Ties(scope="global"), Ties(scope="per_tensor"), DareTies(drop_rate=0.6, seed=5)],
                         ids=repr)
def test_fused_is_chunking_invariant(method):
    # DARE: the kernel's random streams are addressed by flat position, so row chunks drop the same entries
    base, models = _family(4, torch.bfloat16, seed=3)
    with _watch() as (runs, _):
        whole = tiesmerge.merge(base, models, method)
        chunked = tiesmerge.merge(base, models, method, memory_budget=2048)
    for run in runs:
        _assert_fused(run)
    assert runs[1].merged_chunks > runs[0].merged_chunks  # the budget did split tensors
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name


def _count_with_kernel(selector, base, models):
    def run(*counts):
        assert kernels.count_pass([kernels.raw_view(base), *kernels.raw_view(models)], *counts)
    selector.add_counts(run)


def _exact(base, models, keep):
    tau = (models.float() - base.float()).abs()
    return torch.stack([torch.tensor(float("inf")) if k <= 0 else tau[t].kthvalue(tau.shape[1] - k + 1).values
                        for t, k in enumerate(keep)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_counting_kernel_finds_the_exact_threshold_like_the_torch_count(dtype):
    from tiesmerge.engine.select import WindowSelect

    g = torch.Generator().manual_seed(1)
    base = torch.randn(50_000, generator=g).to(dtype)
    models = (base.float() + torch.randn(3, 50_000, generator=g) * torch.tensor([[0.1], [1.0], [0.01]])).to(dtype)
    models[0, :100] = base[:100]  # exact zeros
    for keep in ([1, 20_000, 49_999], [0, 10, 50_000]):
        fused, plain = WindowSelect(keep, "cpu"), WindowSelect(keep, "cpu")
        while not plain.done:
            _count_with_kernel(fused, base, models)
            fused.end_pass()
            plain.observe(models.float() - base.float())
            plain.end_pass()
        assert fused.done and fused.passes == plain.passes <= 2
        assert torch.equal(fused.thresholds(), plain.thresholds())
        assert torch.equal(fused.thresholds(), _exact(base, models, keep))


@pytest.mark.parametrize("where", ["inside", "above", "below", "narrow-bins"])
def test_a_bracket_that_misses_costs_passes_never_exactness(where):
    """Brackets from a sample usually hold the threshold (one pass); any that does not, or
    that is wider than the bins, still ends at the exact value."""
    import numpy as np

    from tiesmerge.engine.select import WindowSelect

    g = torch.Generator().manual_seed(2)
    base = torch.randn(40_000, generator=g)
    models = base + torch.randn(2, 40_000, generator=g) * 0.05
    keep = [8_000, 8_000]
    exact = _exact(base, models, keep)
    bits = exact.numpy().view(np.uint32).astype(np.int64)
    lo, hi, bins = {"inside": (bits - 50, bits + 50, 1 << 12), "above": (bits - 900, bits - 100, 1 << 12),
                    "below": (bits + 100, bits + 900, 1 << 12),
                    "narrow-bins": (bits - 200_000, bits + 200_000, 1 << 4)}[where]
    for counter in ("kernel", "torch"):
        sel = WindowSelect(keep, "cpu", bins=bins, bracket=(lo, hi))
        while not sel.done:
            if counter == "kernel":
                _count_with_kernel(sel, base, models)
            else:
                sel.observe(models - base)
            sel.end_pass()
        assert torch.equal(sel.thresholds(), exact), (where, counter)
        assert sel.passes == (1 if where == "inside" else sel.passes)
        assert sel.passes > 1 or where == "inside"


def test_a_sample_bracket_holds_the_threshold_of_a_heterogeneous_scope():
    """Rows of very different scales widen the bracket (group spread), so it still holds."""
    import numpy as np

    from tiesmerge.engine.select import bracket_from_sample

    g = torch.Generator().manual_seed(3)
    scales = torch.logspace(-4, -1, 64).repeat_interleave(4096)  # 64 blocks of rows, 3 decades apart
    tau = (torch.randn(2, scales.numel(), generator=g) * scales).abs()
    keep = [scales.numel() // 5] * 2
    exact = torch.stack([tau[t].kthvalue(tau.shape[1] - keep[t] + 1).values for t in range(2)]).numpy()
    runs = torch.randint(0, scales.numel() - 256, (64,), generator=g)
    sample = torch.cat([tau[:, r:r + 256] for r in runs], dim=1).numpy()
    groups = np.repeat(np.arange(64) % 16, 256)
    lo, hi = bracket_from_sample(sample, groups, keep, scales.numel())
    bits = exact.view(np.uint32)
    assert ((lo <= bits) & (bits <= hi)).all()


def test_global_merge_makes_one_counting_pass_with_a_sample_bracket(monkeypatch):
    from tiesmerge.engine import executor as ex
    from tiesmerge.engine import reader, reduce

    monkeypatch.setattr(reader, "SAMPLE_RUNS", 64)
    monkeypatch.setattr(reader, "SAMPLE_RUN", 256)
    monkeypatch.setattr(reduce, "SAMPLED_NUMEL", 4 * 64 * 256)  # scopes above it are bracketed by a sample
    g = torch.Generator().manual_seed(4)
    base = {"a": torch.randn(300, 256, generator=g).bfloat16(), "b": torch.randn(100, 64, generator=g).bfloat16()}
    models = [{k: (v.float() + torch.randn(v.shape, generator=g) * 0.01).bfloat16() for k, v in base.items()}
              for _ in range(3)]
    base_ck = StateDictCheckpoint(base, "base")
    model_cks = [StateDictCheckpoint(m, f"m{i}") for i, m in enumerate(models)]

    executor = ex.Executor(reader.EngineInputs(base_ck, tuple(model_cks)), align(base_ck, model_cks), Ties())
    sink = ex.MemorySink(executor.alignment.jobs, None)
    with _watch() as (runs, _):
        stats = executor.run(sink)
    _assert_fused(runs[0])
    assert stats.passes == 2 and stats.sample_bytes > 0  # one counting pass + the merge pass
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIESMERGE_KERNELS", "0")
        plain = tiesmerge.merge(base, models, Ties())
    for name in plain:
        assert torch.equal(sink.state[name], plain[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_tensor_scope_brackets_large_tensors_in_memory(dtype):
    """Tensors of >= 4 x 64 x 512 entries get a bracket sampled in memory; exact all the same."""
    g = torch.Generator().manual_seed(5)
    base = {"big": (torch.randn(400, 512, generator=g) * 0.02).to(dtype), "small": torch.randn(30, 7).to(dtype)}
    models = [{k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3).to(dtype) for k, v in base.items()}
              for _ in range(3)]
    fused, plain, run = _both(base, models, Ties(scope="per_tensor"))
    _assert_fused(run)
    for name in plain:
        assert torch.equal(fused[name], plain[name]), name


@pytest.mark.parametrize("mapped", ["1", "0"])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_files_merge_like_state_dicts_mapped_or_read(tmp_path, monkeypatch, mapped, scope):
    """Rows are mapped from the files (TIESMERGE_MMAP=0: read into buffers); either way the
    merge equals the in-memory one, bit for bit."""
    from helpers_ckpt import write_hf_dir
    from tiesmerge.engine import reader

    monkeypatch.setenv("TIESMERGE_MMAP", mapped)
    monkeypatch.setattr(reader, "_MAP_MIN_BYTES", 1)  # map every chunk, however small
    mapped_rows = []
    real_map = tiesmerge.io.checkpoint.SafetensorsCheckpoint.map_rows
    monkeypatch.setattr(tiesmerge.io.checkpoint.SafetensorsCheckpoint, "map_rows",
                        lambda self, name, rows: mapped_rows.append(name) or real_map(self, name, rows))
    g = torch.Generator().manual_seed(6)
    base = {"big": (torch.randn(1200, 512, generator=g) * 0.02).bfloat16(), "norm": torch.ones(512).bfloat16()}
    models = [{k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3).bfloat16() for k, v in base.items()}
              for _ in range(3)]
    b = write_hf_dir(tmp_path / "base", base, shards=2)
    ms = [write_hf_dir(tmp_path / f"m{i}", m, shards=2) for i, m in enumerate(models)]
    with _watch() as (runs, _):
        from_files = tiesmerge.merge(b, ms, Ties(scope=scope), memory_budget=3 << 20)  # several chunks of 'big'
        in_memory = tiesmerge.merge(base, models, Ties(scope=scope))
    for run in runs:
        _assert_fused(run)
    assert runs[0].merged_chunks > 2  # 'big' in several chunks, and 'norm'
    for name in in_memory:
        assert torch.equal(from_files[name], in_memory[name]), name
    assert bool(mapped_rows) == (mapped == "1")


# ---------------------------------------------------------------- code generation targets

# numba generating AVX2 code only (LLVM's haswell): NUMBA_CPU_NAME alone would keep the host's
# features, AVX-512 included, and LLVM would still emit AVX-512 code on an AVX-512 machine
AVX2_ENV = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}


def _kernel_outputs() -> dict[str, np.ndarray]:
    """Every kernel on a seeded chunk, per stored dtype, as raw bits (compared bit for bit)."""
    g = torch.Generator().manual_seed(7)
    n, size = 3, 3 * 8192 + 123  # several blocks and a ragged last one
    base32 = torch.randn(size, generator=g) * 0.02
    models32 = base32 + torch.randn(n, size, generator=g) * 1e-3
    models32[0, :50] = base32[:50]  # exact zeros of a task vector
    threads = kernels.numba.config.NUMBA_NUM_THREADS
    out: dict[str, np.ndarray] = {}
    for dtype, out_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                             (torch.float32, torch.float32)):
        base, models = base32.to(dtype), models32.to(dtype)
        inputs = [kernels.raw_view(base), *(kernels.raw_view(models[t]) for t in range(n))]
        tau = (models.float() - base.float()).abs()
        thresholds = tau.quantile(0.8, dim=1).numpy().astype(np.float32)
        key = str(dtype).removeprefix("torch.")
        bits_dtype = torch.int16 if out_dtype == torch.bfloat16 else torch.int32  # outputs compared bit for bit
        for label, args in (("ties", ("mass", "zero", None, "mean")),
                            ("ties-count-sum", ("count", "positive", None, "sum")),
                            ("ties-max", ("mass", "majority", -1.0, "max"))):
            target = torch.empty(size, dtype=out_dtype)
            assert kernels.ties_merge(inputs, thresholds, np.array([1.0, 0.5, 2.0], np.float32), 0.9, *args,
                                      kernels.out_view(target))
            out[f"{key}/{label}"] = target.view(bits_dtype).numpy()
        for label, coef, post, mode in (("sum", None, 0.4, 1), ("weighted", np.array([0.5, -1.0, 2.0]), 1.0, 0),
                                        ("mean", None, float(n), 2)):
            target = torch.empty(size, dtype=out_dtype)
            assert kernels.linear_merge(inputs, coef, post, mode, kernels.out_view(target))
            out[f"{key}/linear-{label}"] = target.view(bits_dtype).numpy()
        bits = thresholds.view(np.uint32)
        lo, hi, shift, bins = bits - (1 << 14), bits + (1 << 14), np.full(n, 3, np.uint32), 1 << 12
        counts = (np.zeros((threads, n), np.int64), np.zeros((threads, n, bins), np.int64),
                  np.full((threads, n, bins), 0xFFFFFFFF, np.uint32), np.zeros((threads, n, bins), np.uint32))
        assert kernels.count_pass(inputs, lo, hi, shift, *counts)
        above, window, wmin, wmax = counts
        out[f"{key}/count"] = np.concatenate([above.sum(0).ravel(), window.sum(0).ravel(),
                                              wmin.min(0).ravel().astype(np.int64),
                                              wmax.max(0).ravel().astype(np.int64)])
    return out


@pytest.mark.slow
def test_avx2_code_computes_what_the_default_target_computes(tmp_path):
    """The kernels compiled for AVX2 only (a subprocess: numba reads the target at start-up) give
    the same bits as the default target's, on every dtype and kernel option above."""
    child = ("import sys, numpy as np; sys.path.insert(0, sys.argv[1]); import numba; from test_engine_kernels import "
             "_kernel_outputs; assert (numba.config.CPU_NAME, numba.config.CPU_FEATURES) == ('haswell', ''); "
             "np.savez(sys.argv[2], **_kernel_outputs())")
    env = {**os.environ, **AVX2_ENV}
    subprocess.run([sys.executable, "-c", child, str(Path(__file__).parent), str(tmp_path / "avx2.npz")],
                   env=env, check=True, timeout=600)
    avx2 = np.load(tmp_path / "avx2.npz")
    default = _kernel_outputs()
    assert sorted(avx2.files) == sorted(default)
    for key, value in default.items():
        assert np.array_equal(avx2[key], value), key


@pytest.mark.parametrize("drop", [0.3, 0.5, 0.9, 0.1234567])
def test_dare_kernel_drops_the_entries_of_the_torch_paths_hash_at_any_offset(drop):
    """The kernel's 32-bit hash and integer keep test (kernels._hash_bits: bits >= ceil(float32(drop) 2^24))
    keep exactly the entries methods.ops.hash_uniform keeps (u >= drop), past 2^32 too."""
    from tiesmerge.methods import ops

    n = 50_000
    base, model = np.zeros(n, np.float32), np.ones(n, np.float32)
    for offset in (0, 12345, 2**32 - 100, 2**32 + 17, 2**40 + 3):
        out = np.empty(n, np.float32)
        assert kernels.ties_merge([base, model], None, np.ones(1, np.float32), 1.0, "mass", "zero", None, "sum", out,
                                  None, (kernels.dare_keys(11, 77, 1), drop, offset))
        keep = ops.hash_uniform(11, 77, offset, n, "cpu") >= drop
        assert np.array_equal(out != 0, keep.numpy()), offset
        assert np.all(out[out != 0] == np.float32(1.0 / ops.dare_keep_probability(drop)))
