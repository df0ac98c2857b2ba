"""The chunk planner's arithmetic (engine/plan.py), and the passes plan_merge counts."""

from __future__ import annotations

import pytest
import torch

import tiesmerge
from tiesmerge.engine import plan as plan_mod
from tiesmerge.engine.plan import bytes_per_entry, make_plan, rows_per_chunk
from tiesmerge.io.align import Alignment, TensorJob
from tiesmerge.methods.base import Reduction, Requirements, TopK

MiB = 1 << 20
GiB = 1 << 30
_TRIM = Requirements(trim=TopK(0.2))  # a global trim: counting passes, then the merge


def _sum(tau: torch.Tensor, ctx: object) -> torch.Tensor:
    return tau.sum()


# ---------------------------------------------------------------------------------------------- per-entry bytes


def test_bytes_per_entry_counts_every_buffer() -> None:
    from tiesmerge.engine.plan import _TEMPORARIES as k

    # torch path, n=3 bf16 inputs, bf16 output: raw rows 2 * (3+1) * 2 = 16 (current + read-ahead);
    # tau + k temporaries (1 + k) * 3 * 4 (float32); base32 4, merged32 4, output 2
    assert bytes_per_entry(3, 2, 2) == 16 + (1 + k) * 3 * 4 + 4 + 4 + 2
    # n=1 float32 in, float64 out
    assert bytes_per_entry(1, 4, 8) == 2 * 2 * 4 + (1 + k) * 1 * 4 + 4 + 4 + 8
    # grows linearly with the number of models
    assert bytes_per_entry(11, 2, 2) - bytes_per_entry(10, 2, 2) == 2 * 2 + (1 + k) * 4


# ---------------------------------------------------------------------------------------------- rows per chunk


def test_rows_per_chunk() -> None:
    assert rows_per_chunk((), 100, 1) == 1  # 0-d: one "row"
    assert rows_per_chunk((10, 5), 10, 120) == 2  # 120 // (5 * 10)
    assert rows_per_chunk((10, 5), 10, 99) == 1
    assert rows_per_chunk((10, 5), 10, 1) == 1  # at least one row, even over budget
    assert rows_per_chunk((10, 5), 10, 10**9) == 10  # never more than the tensor
    assert rows_per_chunk((7,), 4, 12) == 3  # 1-d: one entry per row
    assert rows_per_chunk((4, 0, 3), 10, 5) == 4  # empty rows cost nothing


def _alignment(*jobs: TensorJob) -> Alignment:
    return Alignment(tuple(jobs))


def _check_cover(plan: plan_mod.Plan, job: TensorJob) -> None:
    """The chunks of ``job`` are contiguous row ranges covering it once, offsets/numels consistent."""
    chunks = plan.chunks_by_job[job.name]
    if not job.shape:
        assert len(chunks) == 1 and chunks[0].rows is None and chunks[0].numel == 1
        return
    row_entries = job.numel // job.shape[0] if job.shape[0] else 0
    start = 0
    for c in chunks:
        assert c.rows is not None and c.rows.start == start and c.rows.stop > start
        assert c.offset == start * row_entries
        assert c.numel == (c.rows.stop - c.rows.start) * row_entries
        start = c.rows.stop
    assert start == job.shape[0]
    assert sum(c.numel for c in chunks) == job.numel


@pytest.mark.parametrize("n_models", [1, 2, 5])
@pytest.mark.parametrize("budget", [128 * MiB, 256 * MiB, 1 * GiB])
def test_large_tensors_chunk_under_the_budget(n_models: int, budget: int) -> None:
    jobs = [
        TensorJob("embed", (151_936, 4096), torch.bfloat16, merge=True),
        TensorJob("proj", (4096, 11_008), torch.float32, merge=True),
        TensorJob("norm", (4096,), torch.float16, merge=True),
        TensorJob("scale", (), torch.float32, merge=True),
        TensorJob("ids", (1, 4096), torch.int64, merge=False),
    ]
    plan = make_plan(_alignment(*jobs), n_models, _TRIM, memory_budget=budget, out_dtype=None)
    work = budget - plan_mod.FIXED_OVERHEAD
    for job in jobs:
        if not job.merge:
            assert job.name not in plan.chunks_by_job
            continue
        _check_cover(plan, job)
        per_entry = bytes_per_entry(n_models, job.dtype.itemsize, job.dtype.itemsize)
        for c in plan.chunks_by_job[job.name]:
            assert c.numel * per_entry <= work
    assert len(plan.chunks_by_job["embed"]) > 1
    assert plan.peak_bytes <= budget
    assert plan.passes == 2 and plan.pass_names == ("count (trim)", "merge")  # a sampled bracket: one count
    merged_bytes = sum(j.numel * j.dtype.itemsize for j in jobs if j.merge)
    assert plan.bytes_per_pass == merged_bytes * (n_models + 1)
    assert plan.copy_bytes == 4096 * 8
    assert plan.bytes_to_read == plan.bytes_per_pass * 2 + plan.copy_bytes
    assert any("row chunks" in note for note in plan.notes)


def test_a_row_larger_than_the_budget_still_gets_one_row_per_chunk() -> None:
    job = TensorJob("wide", (3, 1_000_000), torch.float32, merge=True)
    plan = make_plan(_alignment(job), 2, memory_budget=4096, out_dtype=None)
    chunks = plan.chunks_by_job["wide"]
    assert [c.rows for c in chunks] == [slice(0, 1), slice(1, 2), slice(2, 3)]
    # the estimate is honest about exceeding the budget
    assert plan.peak_bytes >= 1_000_000 * bytes_per_entry(2, 4, 4)


def test_tiny_budget_keeps_half_for_the_chunk() -> None:
    job = TensorJob("w", (100, 10), torch.float32, merge=True)
    per_entry = bytes_per_entry(2, 4, 4)
    plan = make_plan(_alignment(job), 2, _TRIM, memory_budget=4096, out_dtype=None)
    rows = 2048 // (10 * per_entry)
    assert rows >= 1
    assert all(c.numel <= rows * 10 for c in plan.chunks_by_job["w"])
    assert len(plan.chunks_by_job["w"]) == -(-100 // rows)
    _check_cover(plan, job)


def test_out_dtype_and_aliases_in_output_bytes() -> None:
    jobs = [
        TensorJob("emb", (10, 4), torch.float32, merge=True, aliases=("head",)),
        TensorJob("ids", (5,), torch.int64, merge=False),
    ]
    plan = make_plan(_alignment(*jobs), 2, memory_budget=GiB, out_dtype=torch.bfloat16)
    # merged tensor twice (alias) in bf16; ids as stored; each with its header entry (name + ~64 bytes, hp38 C14)
    assert plan.output_bytes == (40 * 2 + 3 + 64) * 2 + (5 * 8 + 3 + 64)
    assert plan.passes == 1


def test_chunked_per_tensor_scope_passes_are_counted() -> None:
    jobs = [TensorJob("big", (64, 32), torch.float32, merge=True), TensorJob("small", (3,), torch.float32, merge=True)]
    per_tensor = Requirements(trim=TopK(0.2), scope="per_tensor", reductions=(Reduction("majority", _sum),))
    plan = make_plan(_alignment(*jobs), 2, per_tensor, memory_budget=4096, out_dtype=None)
    assert len(plan.chunks_by_job["big"]) > 1 and len(plan.chunks_by_job["small"]) == 1
    # the chunked tensor is read 3 extra times (2 counting passes, 1 for the sum); the single-chunk one is not
    assert plan.reduce_bytes == 64 * 32 * 4 * 3 * 3 and plan.copy_bytes == 0
    assert plan.pass_names == ("merge",)


def test_empty_tensors_plan_one_empty_chunk() -> None:
    jobs = [TensorJob("e", (0, 5), torch.float32, merge=True), TensorJob("f", (5, 0), torch.float32, merge=True)]
    plan = make_plan(_alignment(*jobs), 2, _TRIM, memory_budget=4096, out_dtype=None)
    for job in jobs:
        chunks = plan.chunks_by_job[job.name]
        assert len(chunks) == 1 and chunks[0].numel == 0


# ---------------------------------------------------------------------------------------------- passes via the API


def _family() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = {"w": torch.zeros(64, 32), "b": torch.zeros(3), "ids": torch.arange(3)}
    return base, [{k: v + (k2 + 1) if v.is_floating_point() else v for k, v in base.items()} for k2 in range(2)]


@pytest.mark.parametrize(
    ("method", "opts", "passes"),
    [
        ("ties", {}, 3),
        ("ties", {"zero_sign": "majority"}, 4),
        ("ties", {"scope": "per_tensor"}, 1),
        ("ties", {"scope": "per_tensor", "zero_sign": "majority"}, 1),
        ("magnitude_prune", {}, 3),
        ("task_arithmetic", {}, 1),
        ("average", {}, 1),
        ("dare_ties", {}, 1),
        ("dare_linear", {}, 1),
    ],
)
def test_plan_merge_passes(method: str, opts: dict, passes: int) -> None:
    base, models = _family()
    plan = tiesmerge.plan_merge(base, models, method, **opts)
    assert plan.passes == passes
    assert plan.bytes_per_pass == (64 * 32 + 3) * 4 * 3
    assert plan.copy_bytes == 3 * 8


@pytest.mark.parametrize(("opts", "extra_passes"), [({}, 2), ({"zero_sign": "majority"}, 3)])
def test_plan_merge_per_tensor_chunked_extra_reads(opts: dict, extra_passes: int) -> None:
    base, models = _family()
    plan = tiesmerge.plan_merge(base, models, "ties", scope="per_tensor", memory_budget=4096, **opts)
    assert len(plan.chunks_by_job["w"]) > 1
    assert plan.copy_bytes == 3 * 8
    assert plan.reduce_bytes == 64 * 32 * 4 * 3 * extra_passes


# ---------------------------------------------------------------------------------------------- memory arithmetic


def test_bytes_per_entry_of_either_path() -> None:
    from tiesmerge.engine.plan import bytes_per_entry

    # fused: 2 read slots x (base + n models) x itemsize + 2 output buffers
    assert bytes_per_entry(3, 2, 2, fused=True) == 2 * 4 * 2 + 2 * 2
    assert bytes_per_entry(8, 4, 2, fused=True) == 2 * 9 * 4 + 2 * 2
    assert bytes_per_entry(3, 2, 8, fused=True) == 2 * 4 * 2 + 2 * (4 + 8)  # float32, then the cast


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("budget", [200 * MiB, 512 * MiB, 2 * GiB])
@pytest.mark.parametrize("whole", [False, True])
def test_every_chunk_fits_the_budget(fused: bool, budget: int, whole: bool) -> None:
    """A model larger than the budget is cut so that each chunk's working set, plus the
    fixed overhead, stays under the budget; chunks stop at the speed cap unless kept whole."""
    from tiesmerge.engine.plan import FIXED_OVERHEAD, SPEED_CHUNK_ENTRIES, bytes_per_entry, make_plan
    from tiesmerge.io.align import Alignment, TensorJob

    jobs = tuple(TensorJob(f"w{i}", shape, torch.bfloat16, True) for i, shape in
                 enumerate([(32000, 4096), (11008, 4096), (4096, 4096), (4096,)]))
    n = 8
    req = Requirements(trim=TopK(0.2), scope="per_tensor") if whole else Requirements()
    plan = make_plan(Alignment(jobs), n, req, memory_budget=budget, out_dtype=None, fused=fused)
    per_entry = bytes_per_entry(n, 2, 2, fused=fused)
    assert sum(j.numel for j in jobs) * 2 * (n + 1) > budget  # the inputs are larger than the budget
    for job in jobs:
        chunks = plan.chunks_by_job[job.name]
        assert sum(c.numel for c in chunks) == job.numel
        row = job.numel // job.shape[0]
        for c in chunks:
            assert c.numel * per_entry + FIXED_OVERHEAD <= budget or c.numel == row  # one row is the floor
            if not whole:
                assert c.numel <= max(SPEED_CHUNK_ENTRIES, row)
    assert plan.peak_bytes <= budget
