"""Runs a plan: reduction passes (top-k thresholds, majority sign), then the merge pass.

Each pass streams the merged tensors chunk by chunk: read the base's and every model's rows
(the next chunk is read ahead on a thread while this one computes), merge, cast, and hand the
result to the sink. Nothing larger than a chunk is ever held.

Two ways to compute a chunk:

* the fused CPU path (numba, :mod:`.kernels`): rows are read as stored into two reusable
  buffers (one computed on, one being read ahead) and the kernels widen, subtract, trim, elect,
  merge and round to the output dtype in one pass, writing into a reusable output buffer;
* the torch path (any device, any method): float32 task vectors ``(n, *S)`` on the device,
  handed to the method's ``merge``.

Global top-k starts from a bracket estimated on a sample of runs of entries, so one counting
pass usually finds the exact thresholds (see :mod:`.select`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..errors import ConfigError, InvalidTensorError
from ..io.align import Alignment, TensorJob
from ..io.checkpoint import Checkpoint, read_rows_into
from ..methods.average import Average
from ..methods.base import ChunkContext, MergeMethod
from ..methods.task_arithmetic import TaskArithmetic
from ..methods.ties import Ties
from ..sizes import DEFAULT_MEMORY_BUDGET, format_size, parse_size
from . import kernels
from .plan import FIXED_OVERHEAD, Chunk, Plan, bytes_per_entry, make_plan
from .select import WindowSelect, bracket_from_sample, kth_largest
from .side import SideInputs

__all__ = ["Sink", "MemorySink", "RunStats", "Executor", "RawRows"]

_MAP_MIN_BYTES = 1 << 20  # rows smaller than this are read (a mapping costs a few syscalls)
SAMPLE_RUNS = 1024  # runs of neighbouring entries drawn to bracket a global threshold
SAMPLE_RUN = 1024  # entries per run: one short pread per input
SAMPLE_GROUPS = 32  # run groups whose quantiles measure the estimate's spread
MEMORY_SAMPLE_RUNS, MEMORY_SAMPLE_RUN = 256, 256  # the same for a tensor held in memory (per-tensor scope)
_KERNEL_HIST_BYTES = 32 << 20  # cap on the per-thread window histograms of a counting pass


class Sink(Protocol):
    def write(self, name: str, rows: slice | None, chunk: torch.Tensor) -> None: ...

    def alias(self, name: str, source: str) -> None: ...


class MemorySink:
    """Collects the merged model as a state dict; tied names share one tensor, as in a module."""

    def __init__(self, jobs: Iterable[TensorJob], out_dtype: torch.dtype | None) -> None:
        self.state: dict[str, torch.Tensor] = {}
        for job in jobs:
            dtype = (out_dtype or job.dtype) if job.merge else job.dtype
            self.state[job.name] = torch.empty(job.shape, dtype=dtype)

    def write(self, name: str, rows: slice | None, chunk: torch.Tensor) -> None:
        target = self.state[name]
        (target if rows is None or target.dim() == 0 else target[rows]).copy_(chunk)

    def alias(self, name: str, source: str) -> None:
        self.state[name] = self.state[source]


@dataclass
class RunStats:
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    tensors_merged: int = 0
    tensors_copied: int = 0
    tensors_tied: int = 0
    thresholds: list[float] | None = None  # global scope: one per model
    engine: str = "torch"  # which arithmetic ran: the torch ops or the fused CPU kernels
    passes: int = 0  # passes actually made over all merged tensors (the plan's is an estimate)
    reduce_bytes: int = 0  # bytes read by the reductions of per-tensor scopes too large for one chunk
    sample_bytes: int = 0  # bytes read to bracket global thresholds
    fused_chunks: int = 0  # chunks merged by a fused CPU kernel
    torch_chunks: int = 0  # chunks merged by the torch path (the method's merge)


@dataclass(frozen=True)
class RawRows:
    """One chunk's rows as stored: ``inputs`` holds the base's E raw values, then each model's
    (the kernels' views, :func:`kernels.raw_view`), in reused buffers or in file mappings (a
    mapping is unmapped when the last view of it is dropped, after its chunk);
    ``shape`` and ``dtype`` are the chunk's."""

    inputs: list[np.ndarray]
    dtype: torch.dtype
    shape: tuple[int, ...]

    def tensors(self) -> list[torch.Tensor]:
        """The same bytes as torch tensors in the stored dtype (no copy): base, then models."""
        if self.dtype == torch.float32:
            return [torch.from_numpy(a).view(self.shape) for a in self.inputs]
        return [torch.from_numpy(a).view(self.dtype).view(self.shape) for a in self.inputs]


class _Buffers:
    """Reusable byte buffers, grown on demand: two read slots and one output buffer.

    Reusing them means each pass faults its pages in once, not once per chunk, and the
    memory the budget pays for is exactly these three buffers.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def take(self, key: str, nbytes: int) -> np.ndarray:
        array = self._arrays.get(key)
        if array is None or array.size < nbytes:
            self._arrays.pop(key, None)  # free the old one before allocating the larger
            array = self._arrays[key] = np.empty(max(nbytes, 64), np.uint8)
        return array[:nbytes]


def _sampled_numel() -> int:
    """Scopes above this many entries get a sampled bracket (their sample is under a quarter)."""
    return 4 * SAMPLE_RUNS * SAMPLE_RUN


def _stream_id(name: str) -> int:
    """A stable 32-bit id of a tensor name (Python's hash() is salted per process)."""
    h = 2166136261
    for byte in name.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


class Executor:
    def __init__(self, base: Checkpoint, models: list[Checkpoint], alignment: Alignment, method: MergeMethod, *,
                 device: str | torch.device = "cpu", memory_budget: int = parse_size(DEFAULT_MEMORY_BUDGET),
                 out_dtype: torch.dtype | None = None, weights: torch.Tensor | None = None,
                 progress: Callable[[int], None] | None = None, fused: bool = True,
                 side: SideInputs | None = None) -> None:
        self.base, self.models, self.alignment, self.method = base, models, alignment, method
        self.device = torch.device(device)
        self.out_dtype = out_dtype
        self.n = len(models)
        self.trim = method.trim_spec()
        self.majority = method.needs_majority_sign()
        # models whose rows are already task vectors (PEFT adapters, io/adapters.py): the kernels
        # form τ = model − base from raw rows themselves, so adapters take the torch path
        self._direct = frozenset(t for t, m in enumerate(models) if getattr(m, "yields_task_vector", False))
        self._kernels = fused and kernels.available() and self.device.type == "cpu" and not self._direct
        global_scope = self.trim is not None and self.trim.scope == "global"
        # a sampled bracket usually pins the thresholds in one counting pass; small scopes take
        # the two radix passes (fewer when a bin holds a single value)
        counting = 1 if alignment.merged_numel() > _sampled_numel() else 2
        selection_passes = (counting if global_scope else 0) + (1 if global_scope and self.majority else 0)
        chunked_passes = 0 if global_scope or self.trim is None else 2 + int(self.majority)
        self.plan: Plan = make_plan(alignment, self.n, memory_budget=memory_budget, out_dtype=out_dtype,
                                    selection_passes=selection_passes, chunked_scope_passes=chunked_passes,
                                    fused=self._kernels,
                                    whole_tensors=self.trim is not None and self.trim.scope == "per_tensor",
                                    extra_bytes_per_entry=side.extra_bytes_per_entry() if side else 0)
        self.side = side  # per-model statistics of data-aware methods (Fisher, RegMean)
        if side is not None:
            self.plan = side.adjust_plan(self.plan)
        raw_weights = getattr(method, "weights", None)
        self.weights = (weights if weights is not None else
                        torch.tensor(raw_weights, dtype=torch.float32) if raw_weights is not None else None)
        if self.weights is not None:
            self.weights = self.weights.to(self.device)
        self._progress = progress or (lambda nbytes: None)
        self._checked: set[tuple[str, int]] = set()
        self._buffers = _Buffers()
        self._raw_ok: dict[str, bool] = {}
        self._mmap = os.environ.get("TIESMERGE_MMAP", "1") != "0"  # 0: read every chunk with pread
        self._passes_made = 0
        self._writer: ThreadPoolExecutor | None = None
        self._pending_write: Future | None = None
        self._out_slot = 0
        self.stats = RunStats()
        # fused numba kernels on the CPU: counting for every trimming method, the merge for
        # TIES, task arithmetic and averaging; the torch path for the rest (and for TIES with a
        # sign_from reference: the kernel would merge the reference as one more model)
        self._fused_merge = (self._kernels and type(method) in (Ties, TaskArithmetic, Average)
                             and getattr(method, "threshold_ties", "keep") == "keep"
                             and getattr(method, "sign_from", None) is None)
        self.stats.engine = "fused CPU kernels (numba)" if self._kernels else "torch"


    # ------------------------------------------------------------------ reading
    def _raw(self, job: TensorJob) -> bool:
        """Whether a job's rows go to the kernels as stored: all inputs share one dtype they read."""
        ok = self._raw_ok.get(job.name)
        if ok is None:
            ok = self._raw_ok[job.name] = (
                self._kernels and job.dtype in kernels.RAW_DTYPES
                and all(m.info(job.name).dtype == job.dtype for m in self.models))
        return ok

    def _read(self, chunk: Chunk, slot: int) -> RawRows | list[torch.Tensor]:
        """The chunk's rows of the base and of every model, as stored: into read slot ``slot``
        for the kernels, or as fresh CPU tensors for the torch path."""
        name, rows = chunk.job.name, chunk.rows
        inputs = [self.base, *self.models]
        if self._raw(chunk.job):
            dtype = chunk.job.dtype
            view_dtype = kernels.raw_view(torch.empty(0, dtype=dtype)).dtype
            size = chunk.numel * dtype.itemsize
            shape = chunk.job.shape
            if rows is not None and shape:
                first, stop, _ = rows.indices(shape[0])
                shape = (max(0, stop - first), *shape[1:])
            if self._mmap and size >= _MAP_MIN_BYTES and all(hasattr(c, "map_rows") for c in inputs):
                # file mappings: the kernels read the page cache in place (no copy); unmapped
                # after the chunk, so they never pile up in RSS
                views = [ckpt.map_rows(name, rows).view(view_dtype) for ckpt in inputs]
                payload: RawRows | list[torch.Tensor] = RawRows(views, dtype, tuple(shape))
            else:
                buffer = self._buffers.take(f"read{slot}", size * len(inputs))
                for i, ckpt in enumerate(inputs):
                    read_rows_into(ckpt, name, rows, memoryview(buffer[i * size:(i + 1) * size]))
                typed = buffer.view(view_dtype).reshape(len(inputs), chunk.numel)
                payload = RawRows(list(typed), dtype, tuple(shape))
            nbytes = size * len(inputs)
        else:
            payload = [ckpt.read(name, rows) for ckpt in inputs]
            nbytes = sum(t.numel() * t.element_size() for t in payload)
        self.stats.bytes_read += nbytes
        self._progress(nbytes)
        return payload

    def _stream(self, chunks: list[Chunk]) -> Iterator[tuple[Chunk, RawRows | list[torch.Tensor]]]:
        """Yield (chunk, inputs), reading the next chunk on a thread while the caller computes.

        The two read slots alternate: chunk i+1 is read into the slot chunk i-1 used, which
        the caller finished with when it asked for chunk i.
        """
        if not chunks:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiesmerge-read") as pool:
            pending: Future = pool.submit(self._read, chunks[0], 0)
            for i, chunk in enumerate(chunks):
                clock = time.perf_counter()
                payload = pending.result()
                self._tally("wait_read", clock)
                if i + 1 < len(chunks):
                    pending = pool.submit(self._read, chunks[i + 1], (i + 1) % 2)
                yield chunk, payload

    @staticmethod
    def _tensors(payload: RawRows | list[torch.Tensor]) -> list[torch.Tensor]:
        return payload.tensors() if isinstance(payload, RawRows) else payload

    def _inputs(self, chunk: Chunk, payload: RawRows | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(base32 (*S), models32 (n, *S)) float32 on the device, checked finite on first sight."""
        raw = self._tensors(payload)
        # copy=True: a float32 CPU base read from a state dict (or an mmap'd pickle) is the
        # caller's own tensor, and the merge adds into base32 in place; without the copy,
        # merging would overwrite the caller's base weights.
        base32 = raw[0].to(self.device, torch.float32, non_blocking=True, copy=True)
        models32 = torch.empty((self.n, *base32.shape), dtype=torch.float32, device=self.device)
        for t, model_raw in enumerate(raw[1:]):
            models32[t].copy_(model_raw.to(self.device, non_blocking=True))  # widened to float32 in the copy
        key = (chunk.job.name, chunk.offset)
        if key not in self._checked:
            self._checked.add(key)
            # NaN and Inf survive a sum, so a finite sum proves every entry finite without a
            # mask as large as the chunk; only a non-finite sum (or an overflow) looks closer
            if not (bool(torch.isfinite(models32.sum())) and bool(torch.isfinite(base32.sum()))):
                if not (bool(torch.isfinite(models32).all()) and bool(torch.isfinite(base32).all())):
                    self._raise_not_finite(chunk, raw)
        return base32, models32

    def _task_vectors(self, chunk: Chunk, payload: RawRows | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(base32 (*S), tau (n, *S)) float32 on the device."""
        base32, models32 = self._inputs(chunk, payload)
        if self._direct:  # adapters yield τ itself; only full models subtract the base
            for t in range(self.n):
                if t not in self._direct:
                    models32[t].sub_(base32)
            tau = models32
        else:
            tau = models32.sub_(base32)  # (n, *S), in place: the models' values are not needed again
        if not bool(torch.isfinite(tau.sum())) and not bool(torch.isfinite(tau).all()):
            self._raise_not_finite(chunk, self._tensors(payload))
        return base32, tau

    def _raise_not_finite(self, chunk: Chunk, raw: list[torch.Tensor]) -> None:
        for ckpt, value in zip([self.base, *self.models], raw, strict=True):
            bad = ~torch.isfinite(value.float())
            if bool(bad.any()):
                first = int(bad.reshape(-1).nonzero()[0]) + chunk.offset
                kind = "NaN" if bool(torch.isnan(value.float()).any()) else "Inf"
                raise InvalidTensorError(
                    f"{ckpt.location(chunk.job.name)}: tensor {chunk.job.name!r} {tuple(chunk.job.shape)} holds {kind} "
                    f"({int(bad.sum())} non-finite value(s) in this chunk, first at flat index {first})",
                    hint="the checkpoint is damaged or was saved after a diverged training step; merge another one",
                )
        raise InvalidTensorError(f"tensor {chunk.job.name!r}: the task vector overflows float32 "
                                 "(base and model values differ by more than float32 can hold)")

    def _chunks(self, jobs: Iterable[TensorJob]) -> list[Chunk]:
        return [c for job in jobs for c in self.plan.chunks_by_job[job.name]]

    # ------------------------------------------------------------------ reductions
    def _kernel_bins(self) -> int:
        """Window bins per model for the counting kernel: the per-thread histograms stay
        under ``_KERNEL_HIST_BYTES`` (2^18 bins for a few models on a few cores)."""
        per_bin = 24 * self.n * max(1, kernels.numba.config.NUMBA_NUM_THREADS if kernels.numba else 1)
        bins = 1 << max(12, min(18, (_KERNEL_HIST_BYTES // per_bin).bit_length() - 1))
        return bins

    def _count(self, selector: WindowSelect, chunk: Chunk, payload: RawRows | list[torch.Tensor]) -> None:
        if isinstance(payload, RawRows):
            finite = [True]

            def run(*counts):
                finite[0] = kernels.count_pass(payload.inputs, *counts)

            clock = time.perf_counter()
            selector.add_counts(run)
            self._tally("count_kernel", clock)
            if not finite[0]:
                self._raise_not_finite(chunk, payload.tensors())
        else:
            selector.observe(self._task_vectors(chunk, payload)[1])

    def _sample(self, chunks: list[Chunk], numel: int) -> tuple[np.ndarray, np.ndarray]:
        """|tau| at ``SAMPLE_RUNS`` runs of ``SAMPLE_RUN`` neighbouring entries drawn uniformly
        over the scope (seeded: the same merge draws the same runs): (n, S) float32, and each
        entry's run group (S,)."""
        jobs = list(dict.fromkeys(c.job for c in chunks))
        starts = np.cumsum([0] + [j.numel for j in jobs])  # flat offset of each job in the scope
        rng = np.random.default_rng(numel)
        picks = np.sort(rng.integers(0, numel, SAMPLE_RUNS))
        inputs = [self.base, *self.models]
        values = torch.empty((len(inputs), SAMPLE_RUNS * SAMPLE_RUN), dtype=torch.float32)  # widened as copied
        groups = np.empty(SAMPLE_RUNS * SAMPLE_RUN, np.int64)
        which = np.searchsorted(starts, picks, side="right") - 1  # job of each run
        filled = 0
        for j in np.unique(which):
            job = jobs[j]
            local = picks[which == j] - starts[j]  # run starts inside this tensor
            counts = np.minimum(SAMPLE_RUN, job.numel - local)
            # entries of every run of this tensor, as one gather: (runs * counts) flat indices
            index = np.concatenate([np.arange(a, a + c) for a, c in zip(local, counts, strict=True)])
            for i, ckpt in enumerate(inputs):
                if hasattr(ckpt, "map_rows") and job.numel * job.dtype.itemsize >= _MAP_MIN_BYTES:
                    raw = ckpt.map_rows(job.name, None, populate=False)  # only the sampled pages are read
                    flat = torch.from_numpy(raw.view(np.uint8)).view(ckpt.info(job.name).dtype)
                else:
                    flat = ckpt.read(job.name).reshape(-1)
                picked = flat[torch.from_numpy(index)]
                self.stats.sample_bytes += picked.numel() * picked.element_size()
                values[i, filled:filled + len(index)].copy_(picked)
                del flat, picked  # unmaps the tensor
            groups[filled:filled + len(index)] = np.repeat(np.nonzero(which == j)[0] % SAMPLE_GROUPS, counts)
            filled += len(index)
        # |τ| per model: model − base, or an adapter's rows as they are (they are τ already)
        from_base = torch.tensor([t not in self._direct for t in range(self.n)], dtype=torch.float32)[:, None]
        sample = (values[1:, :filled] - from_base * values[0, :filled]).abs_().numpy()  # (n, S)
        return np.nan_to_num(sample, nan=np.inf), groups[:filled]

    def _select(self, chunks: list[Chunk], numel: int) -> torch.Tensor:
        """Exact per-model thresholds over the scope made of ``chunks`` (``numel`` entries)."""
        assert self.trim is not None
        keep = self.trim.keep_counts(numel, self.n)
        bracket = None
        if numel > _sampled_numel() and keep[0] > 0:  # smaller scopes: two passes cost little
            clock = time.perf_counter()
            sample, groups = self._sample(chunks, numel)
            bracket = bracket_from_sample(sample, groups, keep, numel)
            self._tally("sample", clock)
        use_kernels = any(self._raw(c.job) for c in chunks)
        selector = WindowSelect(keep, self.device, bins=self._kernel_bins() if use_kernels else 1 << 16,
                                bracket=bracket)
        while not selector.done:
            for chunk, payload in self._stream(chunks):
                self._count(selector, chunk, payload)
            selector.end_pass()
        self._passes_made = selector.passes
        return selector.thresholds().to(self.device)

    def _majority(self, chunks: list[Chunk], thresholds: torch.Tensor) -> float:
        total = 0.0
        for chunk, payload in self._stream(chunks):
            ctx = ChunkContext(thresholds=thresholds, weights=self.weights)
            total += self.method.elected_sign_sum(self._task_vectors(chunk, payload)[1], ctx)
        return float(torch.tensor(total).sign())

    def _select_in_memory(self, chunk: Chunk, raw: RawRows, numel: int) -> torch.Tensor:
        """Thresholds of a per-tensor scope held in one chunk: counting passes over memory,
        from a bracket sampled in memory when the tensor is large enough to be worth it."""
        assert self.trim is not None
        keep = self.trim.keep_counts(numel, self.n)
        bracket = None
        if numel >= 4 * MEMORY_SAMPLE_RUNS * MEMORY_SAMPLE_RUN and keep[0] > 0:
            rng = np.random.default_rng(numel)
            starts = rng.integers(0, numel - MEMORY_SAMPLE_RUN, MEMORY_SAMPLE_RUNS)
            index = (starts[:, None] + np.arange(MEMORY_SAMPLE_RUN)).reshape(-1)  # one gather for all runs
            picked = torch.from_numpy(np.stack([a[index] for a in raw.inputs]))  # (n + 1, S) raw
            values = (picked.view(raw.dtype) if raw.dtype != torch.float32 else picked).float()
            sample = np.nan_to_num((values[1:] - values[0]).abs_().numpy(), nan=np.inf)
            groups = np.repeat(np.arange(MEMORY_SAMPLE_RUNS) % 16, MEMORY_SAMPLE_RUN)
            bracket = bracket_from_sample(sample, groups, keep, numel)
        # per-thread histograms are cleared and summed per tensor: one bin per 256 entries keeps
        # that under the counting itself, and bins of up to 2^8 patterns still record min/max
        bins = min(self._kernel_bins(), max(1 << 10, 1 << max(0, (numel // 256).bit_length() - 1)))
        selector = WindowSelect(keep, self.device, bins=bins, bracket=bracket)
        while not selector.done:
            self._count(selector, chunk, raw)
            selector.end_pass()
        return selector.thresholds()

    def _inline_thresholds(self, tau: torch.Tensor, numel: int) -> torch.Tensor:
        assert self.trim is not None
        keeps = self.trim.keep_counts(numel, self.n)
        flat = tau.reshape(self.n, -1).abs()  # (n, numel)
        return torch.stack([kth_largest(flat[t], keeps[t]) for t in range(self.n)]).to(torch.float32)

    # ------------------------------------------------------------------ passes
    def _tally(self, what: str, since: float) -> None:
        """Add the time since ``since`` to the profile in ``stats.seconds`` (reported, not gated)."""
        key = f"profile.{what}"
        self.stats.seconds[key] = self.stats.seconds.get(key, 0.0) + time.perf_counter() - since

    def _write(self, fn: Callable[..., None], *args: object) -> None:
        """Queue a sink call on the writer thread, in order, after the previous one finished.

        At most one write is in flight: while chunk i is written, chunk i+1 is computed into
        the other output buffer, and chunk i+2 waits here until chunk i's buffer is free.
        """
        if self._pending_write is not None:
            clock = time.perf_counter()
            self._pending_write.result()  # re-raises the writer's error here
            self._tally("wait_write", clock)
        self._pending_write = self._writer.submit(fn, *args)

    def run(self, sink: Sink) -> RunStats:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiesmerge-write") as writer:
            self._writer, self._pending_write = writer, None
            try:
                return self._run(sink)
            finally:
                if self._pending_write is not None:
                    pending, self._pending_write = self._pending_write, None
                    pending.result()

    def _run(self, sink: Sink) -> RunStats:
        merged_jobs = [j for j in self.alignment.jobs if j.merge]
        clock = time.perf_counter()
        thresholds = majority = None
        if self.trim is not None and self.trim.scope == "global":
            thresholds = self._select(self._chunks(merged_jobs), self.alignment.merged_numel())
            self.stats.passes += self._passes_made
            self.stats.thresholds = [float(x) for x in thresholds.cpu()]
            self.stats.seconds["select"] = time.perf_counter() - clock
            clock = time.perf_counter()
            if self.majority:
                majority = self._majority(self._chunks(merged_jobs), thresholds)
                self.stats.passes += 1
                self.stats.seconds["majority"] = time.perf_counter() - clock
                clock = time.perf_counter()
        for job in self.alignment.jobs:
            if job.merge:
                self._merge_job(job, sink, thresholds, majority)
                self.stats.tensors_merged += 1
            else:
                value = self.base.read(job.name)
                self.stats.bytes_read += value.numel() * value.element_size()
                self._progress(value.numel() * value.element_size())
                self._write(sink.write, job.name, None, value)
                self.stats.tensors_copied += 1
            for alias in job.aliases:
                self._write(sink.alias, alias, job.name)
                self.stats.tensors_tied += 1
        self.stats.passes += 1
        self.stats.seconds["merge"] = time.perf_counter() - clock
        return self.stats

    def _merge_job(self, job: TensorJob, sink: Sink, thresholds: torch.Tensor | None, majority: float | None) -> None:
        chunks = list(self.plan.chunks_by_job[job.name])
        per_tensor = self.trim is not None and self.trim.scope == "per_tensor"
        exact_k = getattr(self.method, "threshold_ties", "keep") == "sort"
        if exact_k and len(chunks) > 1:
            out_size = (self.out_dtype or job.dtype).itemsize
            needed = job.numel * bytes_per_entry(self.n, job.dtype.itemsize, out_size) + FIXED_OVERHEAD
            raise ConfigError(f"tensor {job.name!r} {tuple(job.shape)} does not fit one chunk under the memory "
                              "budget, and threshold_ties='sort' (mergekit's exact k) needs it whole",
                              hint=f"raise --memory-budget to {format_size(needed)} or more, or use "
                                   "threshold_ties='keep'")
        if per_tensor and len(chunks) > 1:  # a per-tensor scope too large for one chunk: reduce first
            before = self.stats.bytes_read
            thresholds = self._select(chunks, job.numel)
            if self.majority:
                majority = self._majority(chunks, thresholds)
            self.stats.reduce_bytes += self.stats.bytes_read - before
        stream = _stream_id(job.name)
        out_dtype = self.out_dtype or job.dtype
        for chunk, payload in self._stream(chunks):
            if isinstance(payload, RawRows) and self._fused_merge and not (per_tensor and self.majority and len(chunks) == 1):
                if per_tensor and len(chunks) == 1:
                    thresholds = self._select_in_memory(chunk, payload, job.numel)
                self._out_slot ^= 1  # the other output buffer: the last chunk may still be being written
                clock = time.perf_counter()
                merged = self._fused_chunk(chunk, payload, thresholds, majority, out_dtype, self._out_slot)
                self._tally("merge_kernel", clock)
                self.stats.fused_chunks += 1
                self._write(sink.write, job.name, chunk.rows, merged)
                continue
            base32, tau = self._task_vectors(chunk, payload)
            chunk_thresholds, chunk_majority = thresholds, majority
            if per_tensor and len(chunks) == 1:
                chunk_thresholds = self._inline_thresholds(tau, job.numel)
                if self.majority:
                    ctx = ChunkContext(thresholds=chunk_thresholds, weights=self.weights)
                    chunk_majority = float(torch.tensor(self.method.elected_sign_sum(tau, ctx)).sign())
            keep = torch.tensor(self.trim.keep_counts(job.numel, self.n), device=self.device) if exact_k else None
            ctx = ChunkContext(thresholds=chunk_thresholds, majority=chunk_majority, weights=self.weights,
                               stream=stream, offset=chunk.offset, keep=keep,
                               side=self.side.read(chunk) if self.side is not None else None)
            delta = self.method.merge(tau, ctx)  # (*S) float32
            self.stats.torch_chunks += 1
            merged = base32.add_(delta).to(out_dtype)
            self._write(sink.write, job.name, chunk.rows, merged.cpu() if merged.device.type != "cpu" else merged)

    def _fused_chunk(self, chunk: Chunk, raw: RawRows, thresholds: torch.Tensor | None, majority: float | None,
                     out_dtype: torch.dtype, slot: int) -> torch.Tensor:
        """One chunk through a fused kernel, into output buffer ``slot``: (*S) ``out_dtype``."""
        direct = out_dtype in kernels.OUT_DTYPES  # bfloat16 and float32 are written by the kernel
        kernel_dtype = out_dtype if direct else torch.float32
        buffer = self._buffers.take(f"out{slot}", chunk.numel * kernel_dtype.itemsize)
        out = torch.from_numpy(buffer).view(kernel_dtype)
        target = kernels.out_view(out)
        m = self.method
        if isinstance(m, Ties):
            w = np.ones(self.n, np.float32) if self.weights is None else self.weights.cpu().numpy()
            finite = kernels.ties_merge(raw.inputs, thresholds.cpu().numpy(), w, m.lam, m.elect,
                                        m.zero_sign, majority, m.aggregate, target)
        elif isinstance(m, TaskArithmetic):
            coef = None if self.weights is None else self.weights.cpu().numpy()
            finite = kernels.linear_merge(raw.inputs, coef, m.lam, 1, target)
        else:  # Average: the torch path's mean (sum / n), or sum of w_t / sum(w) * tau_t
            coef = None if self.weights is None else (self.weights / self.weights.sum()).cpu().numpy()
            finite = kernels.linear_merge(raw.inputs, coef, float(self.n), 2 if coef is None else 0, target)
        if not finite:
            self._raise_not_finite(chunk, raw.tensors())
        out = out.view(raw.shape)
        return out if direct else out.to(out_dtype)
