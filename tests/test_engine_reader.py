"""The reader (engine/reader.py): a chunk's rows as stored, raw for the kernels or as tensors, mapped
or read with pread; widening stored floats without torch; the seeded sample of |tau| that brackets
a global threshold; whole tensors copied from the base; the checkpoint, tensor and index of a NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import make_base, write_hf_dir
from tiesmerge.dtypes import BY_CODE
from tiesmerge.engine import fused
from tiesmerge.engine import reader as reader_mod
from tiesmerge.engine.plan import make_plan
from tiesmerge.engine.reader import (
    SAMPLE_GROUPS,
    SAMPLE_RUN,
    SAMPLE_RUNS,
    EngineInputs,
    RawRows,
    Reader,
    widen,
)
from tiesmerge.errors import InvalidTensorError
from tiesmerge.io.align import align
from tiesmerge.io.checkpoint import SafetensorsCheckpoint, open_checkpoint

State = dict[str, torch.Tensor]
SHAPES = {"w": (24, 16), "v": (40,), "s": ()}


def family(dtype: torch.dtype, n: int = 2, shapes: dict[str, tuple[int, ...]] = SHAPES) -> tuple[State, list[State]]:
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    models = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
              for _ in range(n)]
    return base, models


@pytest.fixture()
def opened(tmp_path):
    """Opens a base and models as HF directories (models in two shards); closes them afterwards."""
    ckpts = []

    def open_family(base: State, models: list[State]) -> tuple[EngineInputs, object]:
        b = open_checkpoint(write_hf_dir(tmp_path / "base", base))
        ms = [open_checkpoint(write_hf_dir(tmp_path / f"m{k}", m, shards=2)) for k, m in enumerate(models)]
        ckpts.extend([b, *ms])
        return EngineInputs(b, tuple(ms)), align(b, ms)

    yield open_family
    for c in ckpts:
        c.close()


def chunks_of(alignment, n: int, budget: int = 1024) -> list:
    """Every merged tensor's chunks; a budget of 1 KiB gives one row per chunk."""
    plan = make_plan(alignment, n, memory_budget=budget, out_dtype=None)
    return [c for job in alignment.jobs if job.merge for c in plan.chunks_by_job[job.name]]


def stored(state: State, chunk) -> torch.Tensor:
    value = state[chunk.job.name]
    return value if chunk.rows is None else value[chunk.rows]


def as_bytes(value: torch.Tensor) -> bytes:
    return value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------------------------------------- chunks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_raw_and_tensor_reads_give_the_stored_values(opened, dtype):
    base, models = family(dtype)
    inputs, alignment = opened(base, models)
    raw_reader, torch_reader = Reader(inputs, raw=True), Reader(inputs, raw=False)
    chunks = chunks_of(alignment, 2)
    assert len(chunks) > 24 + 1  # one row of w per chunk
    for chunk in chunks:
        raw = raw_reader.read(chunk)
        assert isinstance(raw, RawRows) and raw.dtype.torch == dtype
        as_tensors = torch_reader.read(chunk)
        assert isinstance(as_tensors, list)
        for got, want, state in zip(raw.tensors(), as_tensors, [base, *models], strict=True):
            assert got.dtype == want.dtype == dtype and got.shape == want.shape
            assert torch.equal(got, want) and torch.equal(got, stored(state, chunk))
    nbytes = sum(t.numel() * t.element_size() for t in base.values()) * 3
    assert raw_reader.bytes_read == torch_reader.bytes_read == nbytes


def test_rows_the_kernels_cannot_take_come_as_tensors(opened):
    base, models = family(torch.float64)
    base["mixed"] = torch.randn(4, 3, dtype=torch.bfloat16)
    for m in models:
        m["mixed"] = torch.randn(4, 3)  # float32 fine-tunes of a bfloat16 tensor
    inputs, alignment = opened(base, models)
    reader = Reader(inputs, raw=True)
    for chunk in chunks_of(alignment, 2):
        assert not reader.raw(chunk.job)
        payload = reader.read(chunk)
        assert isinstance(payload, list)
        assert all(torch.equal(t, stored(s, chunk)) for t, s in zip(payload, [base, *models], strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mapped_and_pread_rows_are_the_same_bytes(opened, monkeypatch, dtype):
    base, models = family(dtype)
    inputs, alignment = opened(base, models)
    mapped_calls = []
    real_map = SafetensorsCheckpoint.map_rows

    def counting_map(self, name, rows, **kwargs):
        mapped_calls.append(name)
        return real_map(self, name, rows, **kwargs)

    monkeypatch.setattr(SafetensorsCheckpoint, "map_rows", counting_map)
    chunks = chunks_of(alignment, 2)
    monkeypatch.setenv("TIESMERGE_MMAP", "1")
    Reader(inputs, raw=True).read(chunks[0])
    assert mapped_calls == []  # rows under 1 MiB are read, not mapped
    monkeypatch.setattr(reader_mod, "_MAP_MIN_BYTES", 0)
    mapped = Reader(inputs, raw=True)
    monkeypatch.setenv("TIESMERGE_MMAP", "0")
    pread = Reader(inputs, raw=True)
    for chunk in chunks:
        before = len(mapped_calls)
        via_map = [a.tobytes() for a in mapped.read(chunk).inputs]
        assert len(mapped_calls) == before + 3  # the base and both models mapped
        via_pread = [a.tobytes() for a in pread.read(chunk).inputs]
        assert len(mapped_calls) == before + 3  # TIESMERGE_MMAP=0: nothing mapped
        assert via_map == via_pread
        assert via_map == [as_bytes(stored(s, chunk)) for s in [base, *models]]


def test_stream_reads_ahead_and_counts_every_byte(opened):
    base, models = family(torch.bfloat16)
    inputs, alignment = opened(base, models)
    seen = []
    reader = Reader(inputs, raw=True, progress=seen.append)
    chunks = chunks_of(alignment, 2)
    streamed = []
    for chunk, payload in reader.stream(chunks):  # two read slots alternate under the caller
        streamed.append(chunk)
        assert all(torch.equal(t, stored(s, chunk)) for t, s in zip(payload.tensors(), [base, *models], strict=True))
    assert streamed == chunks
    assert sum(seen) == reader.bytes_read == sum(t.numel() * 2 for t in base.values()) * 3
    assert list(reader.stream([])) == []


def test_adapters_rows_are_task_vectors_already(tmp_path):
    base = make_base(0)
    base_ckpt = open_checkpoint(write_hf_dir(tmp_path / "base", base))
    adapter = open_checkpoint(write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=0), alpha=4.0))
    adapter.bind(base_ckpt)
    full = {k: v + 0.5 for k, v in base.items()}
    model = open_checkpoint(full, label="full model")
    inputs = EngineInputs(base_ckpt, [adapter, model])
    assert inputs.models == (adapter, model) and inputs.direct == frozenset({0})
    assert inputs.all == [base_ckpt, adapter, model]
    reader = Reader(inputs, raw=True)
    assert not reader.raw_wanted  # an adapter's rows are computed, never stored
    name = "model.layers.0.mlp.up_proj.weight"
    job = next(j for j in align(base_ckpt, [adapter, model]).jobs if j.name == name)
    chunk = make_plan(align(base_ckpt, [adapter, model]), 2, memory_budget=1 << 30, out_dtype=None
                      ).chunks_by_job[job.name][0]
    rows = reader.task_vectors(chunk, reader.read(chunk))
    assert torch.equal(rows.tau[0], adapter.read(name))  # delta W as it is
    assert torch.equal(rows.tau[1], full[name] - base[name])  # a full model minus the base
    assert torch.equal(rows.base, base[name]) and rows.reference is None


# ---------------------------------------------------------------------------------------------- widen


SPECIAL = [0.0, -0.0, 1.0, -2.5, 65504.0, 6e-8, -1e-40, 3e38, -3.4e38, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("code", ["BF16", "F16", "F32", "F64"])
def test_widen_matches_torch(code):
    dtype = BY_CODE[code]
    g = torch.Generator().manual_seed(1)
    exponents = torch.randint(-45, 45, (2000,), generator=g).double()
    values = torch.cat([torch.tensor(SPECIAL, dtype=torch.float64),
                        torch.randn(2000, generator=g, dtype=torch.float64) * 10.0 ** exponents])
    kept = values.to(dtype.torch)
    want = kept.float().numpy()  # torch's own widening
    views = [kept.view(torch.uint8).numpy().view(dtype.numpy)]  # the stored bytes (bfloat16: its bits)
    if code in fused.RAW_VIEWS:
        views.append(views[0].view(fused.RAW_VIEWS[code]))  # as the kernels' readers view them
    for raw in views:
        with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, as torch gives
            got = widen(raw, dtype)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)  # NaN where torch has NaN
        assert (np.signbit(got) == np.signbit(want)).all()  # -0.0 kept


@pytest.mark.parametrize("code", ["F8_E4M3", "I64", "BOOL"])
def test_widen_refuses_what_needs_torch(code):
    with pytest.raises(TypeError, match=f"cannot widen {BY_CODE[code].name} without torch"):
        widen(np.zeros(2, BY_CODE[code].numpy), BY_CODE[code])


# ---------------------------------------------------------------------------------------------- sample


def expected_sample(base: State, models: list[State], names: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    """|tau| (n, S) float32 computed with torch at the runs the seeded draw picks, and each
    entry's run group: SAMPLE_RUNS runs of SAMPLE_RUN neighbours, clipped at a tensor's end."""
    tau = [torch.cat([(m[k].float() - base[k].float()).reshape(-1) for k in names]).abs() for m in models]
    sizes = [base[k].numel() for k in names]
    starts = np.cumsum([0, *sizes])
    numel = int(starts[-1])
    picks = np.sort(np.random.default_rng(numel).integers(0, numel, SAMPLE_RUNS))  # the reader's seeded draw
    index, groups = [], []
    for i, pick in enumerate(picks):
        j = int(np.searchsorted(starts, pick, side="right")) - 1
        stop = min(int(pick) + SAMPLE_RUN, int(starts[j + 1]))  # a run never crosses into the next tensor
        index.append(torch.arange(int(pick), stop))
        groups.append(np.full(stop - int(pick), i % SAMPLE_GROUPS))
    flat = torch.cat(index)
    return torch.stack([t[flat] for t in tau]), np.concatenate(groups)


@pytest.mark.parametrize(("layout", "dtype"), [("files", torch.float32), ("files", torch.bfloat16),
                                               ("files", torch.float16), ("mapped", torch.bfloat16),
                                               ("state_dict", torch.bfloat16)])
def test_sample_is_abs_tau_at_the_drawn_runs(opened, monkeypatch, layout, dtype):
    shapes = {"a": (300, 7), "b": (500,), "c": (64, 33)}
    base, models = family(dtype, n=3, shapes=shapes)
    if layout == "state_dict":
        b = open_checkpoint(base, label="base")
        inputs = EngineInputs(b, tuple(open_checkpoint(m, label=f"m{k}") for k, m in enumerate(models)))
        alignment = align(b, list(inputs.models))
    else:
        if layout == "mapped":
            monkeypatch.setattr(reader_mod, "_MAP_MIN_BYTES", 0)
        inputs, alignment = opened(base, models)
    reader = Reader(inputs, raw=False)
    chunks = chunks_of(alignment, 3, budget=1 << 30)
    numel = sum(t.numel() for t in base.values())
    values, groups = reader.sample(chunks, numel)
    want, want_groups = expected_sample(base, models, list(shapes))
    assert values.dtype == np.float32 and values.shape == tuple(want.shape)
    assert torch.equal(torch.from_numpy(values), want)
    assert np.array_equal(groups, want_groups)
    assert reader.sample_bytes == want.shape[1] * dtype.itemsize * 4  # the base and 3 models
    again, _ = Reader(inputs, raw=False).sample(chunks, numel)
    assert np.array_equal(again, values)  # seeded: the same merge draws the same runs


# ---------------------------------------------------------------------------------------------- read_whole


def test_read_whole_gives_the_stored_tensor(opened):
    base, models = family(torch.bfloat16)
    base["ids"] = torch.arange(10, dtype=torch.int64).reshape(2, 5)
    for m in models:
        m["ids"] = base["ids"] + 7
    inputs, alignment = opened(base, models)
    seen = []
    reader = Reader(inputs, raw=True, progress=seen.append)
    for job in alignment.jobs:
        value = reader.read_whole(inputs.base, job)  # a file: its bytes as numpy, no torch
        assert isinstance(value, np.ndarray) and value.shape == job.shape and value.dtype == job.dtype_info.numpy
        assert value.tobytes() == as_bytes(base[job.name])
    assert reader.bytes_read == sum(seen) == sum(t.numel() * t.element_size() for t in base.values())
    in_memory = open_checkpoint(base, label="base")
    ids = next(j for j in alignment.jobs if j.name == "ids")
    assert not ids.merge
    value = Reader(EngineInputs(in_memory, ()), raw=False).read_whole(in_memory, ids)  # a state dict: its tensor
    assert isinstance(value, torch.Tensor) and torch.equal(value, base["ids"])


# ---------------------------------------------------------------------------------------------- not finite


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize(("value", "kind"), [(math.nan, "NaN"), (math.inf, "Inf"), (-math.inf, "Inf")])
@pytest.mark.parametrize("who", [0, 2])  # the base, the second model
def test_a_non_finite_value_names_its_checkpoint_tensor_and_index(opened, raw, value, kind, who):
    base, models = family(torch.float32)
    states = [base, *models]
    states[who]["w"][13, 5] = value  # flat index 13 * 16 + 5 = 213
    inputs, alignment = opened(base, models)
    reader = Reader(inputs, raw=raw)
    failed = []
    for chunk in chunks_of(alignment, 2):
        payload = reader.read(chunk)
        try:
            reader.task_vectors(chunk, payload)
        except InvalidTensorError as exc:
            failed.append((chunk, exc))
    assert [(c.job.name, c.rows) for c, _ in failed] == [("w", slice(13, 14))]  # one row per chunk
    where = inputs.all[who].location("w")
    assert failed[0][1].message == (f"{where}: tensor 'w' (24, 16) holds {kind} (1 non-finite value(s) in this "
                                    "chunk, first at flat index 213)")


def test_a_task_vector_beyond_float32_is_named(opened):
    base = {"w": torch.full((4, 2), -3e38)}
    models = [{"w": torch.full((4, 2), 3e38)}]  # finite values, but 6e38 does not fit a float32
    inputs, alignment = opened(base, models)
    reader = Reader(inputs, raw=False)
    chunk = chunks_of(alignment, 1, budget=1 << 30)[0]
    with pytest.raises(InvalidTensorError, match="tensor 'w': the task vector overflows float32"):
        reader.task_vectors(chunk, reader.read(chunk))
