"""The fused CPU kernels compute exactly what the torch path computes (which the float64
reference in test_methods.py checks), for every TIES option, scope, dtype and chunking."""

from __future__ import annotations

import pytest
import torch

import tiesmerge
from tiesmerge.engine import kernels
from tiesmerge.io.align import align
from tiesmerge.io.checkpoint import StateDictCheckpoint
from tiesmerge.methods import Average, MagnitudePrune, TaskArithmetic, Ties

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


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
    fused = tiesmerge.merge(base, models, method, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIESMERGE_KERNELS", "0")
        plain = tiesmerge.merge(base, models, method, **kwargs)
    return fused, plain


@pytest.mark.parametrize("method", [
    Ties(), Ties(scope="per_tensor"), Ties(density=0.7, elect="count"), Ties(zero_sign="positive"),
    Ties(aggregate="sum", lam=1.3), Ties(aggregate="max"), Ties(weights=(0.5, 2.0, 1.0)),
    Ties(weights=(-1.0, 1.0, 0.5), scope="per_tensor"), Ties(density=1.0), Ties(density=0.01),
    Ties(zero_sign="majority"), Ties(zero_sign="majority", scope="per_tensor"), MagnitudePrune(),
    TaskArithmetic(), TaskArithmetic(lam=0.7, weights=(0.5, -1.0, 2.0)), Average(), Average(weights=(1.0, 3.0, 0.5)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_equals_torch_path(method, dtype):
    base, models = _family(3, dtype)
    fused, plain = _both(base, models, method)
    for name in plain:
        assert fused[name].dtype == plain[name].dtype
        assert torch.equal(fused[name], plain[name]), name


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_fused_is_chunking_invariant(scope):
    base, models = _family(4, torch.bfloat16, seed=3)
    whole = tiesmerge.merge(base, models, Ties(scope=scope))
    chunked = tiesmerge.merge(base, models, Ties(scope=scope), memory_budget=2048)
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
                    "below": (bits + 100, bits + 900, 1 << 12), "narrow-bins": (bits - 200_000, bits + 200_000, 1 << 4)}[where]
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
    stats = executor.run(sink)
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
    fused, plain = _both(base, models, Ties(scope="per_tensor"))
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
    from_files = tiesmerge.merge(b, ms, Ties(scope=scope), memory_budget=3 << 20)  # several chunks of 'big'
    in_memory = tiesmerge.merge(base, models, Ties(scope=scope))
    for name in in_memory:
        assert torch.equal(from_files[name], in_memory[name]), name
    assert bool(mapped_rows) == (mapped == "1")
