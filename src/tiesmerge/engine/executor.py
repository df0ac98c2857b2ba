"""Runs a plan: reduction passes (top-k thresholds, majority sign), then the merge pass.

Each pass streams the merged tensors chunk by chunk: read the base's and every model's rows
(the next chunk is read ahead on a thread while this one computes), form the float32 task
vectors on the device, hand them to the method, add the result to the base, cast, and give it
to the sink. Nothing larger than a chunk is ever held.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import InvalidTensorError
from ..io.align import Alignment, TensorJob
from ..io.checkpoint import Checkpoint
from ..methods import ops
from ..methods.base import ChunkContext, MergeMethod
from ..methods.ties import Ties
from . import kernels
from .plan import Chunk, Plan, make_plan
from .select import RadixSelect, kth_largest

__all__ = ["Sink", "MemorySink", "RunStats", "Executor"]


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


def _stream_id(name: str) -> int:
    """A stable 32-bit id of a tensor name (Python's hash() is salted per process)."""
    h = 2166136261
    for byte in name.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


class Executor:
    def __init__(self, base: Checkpoint, models: list[Checkpoint], alignment: Alignment, method: MergeMethod, *,
                 device: str | torch.device = "cpu", memory_budget: int = 2 << 30,
                 out_dtype: torch.dtype | None = None, weights: torch.Tensor | None = None,
                 progress: Callable[[int], None] | None = None, fused: bool = True) -> None:
        self.base, self.models, self.alignment, self.method = base, models, alignment, method
        self.device = torch.device(device)
        self.out_dtype = out_dtype
        self.n = len(models)
        self.trim = method.trim_spec()
        self.majority = method.needs_majority_sign()
        global_scope = self.trim is not None and self.trim.scope == "global"
        selection_passes = (2 if global_scope else 0) + (1 if global_scope and self.majority else 0)
        chunked_passes = 0 if global_scope or self.trim is None else 2 + int(self.majority)
        self.plan: Plan = make_plan(alignment, self.n, memory_budget=memory_budget, out_dtype=out_dtype,
                                    selection_passes=selection_passes, chunked_scope_passes=chunked_passes)
        raw_weights = getattr(method, "weights", None)
        self.weights = (weights if weights is not None else
                        torch.tensor(raw_weights, dtype=torch.float32) if raw_weights is not None else None)
        if self.weights is not None:
            self.weights = self.weights.to(self.device)
        self._progress = progress or (lambda nbytes: None)
        self._checked: set[tuple[str, int]] = set()
        self.stats = RunStats()
        # fused numba kernels on the CPU: histograms for every trimming method, the merge for TIES
        self._fused_select = fused and kernels.available() and self.device.type == "cpu"
        self._fused_ties = self._fused_select and isinstance(method, Ties) and method.sign_from is None
        self.stats.engine = "fused CPU kernels (numba)" if self._fused_select else "torch"


    # ------------------------------------------------------------------ reading
    def _read(self, chunk: Chunk) -> list[torch.Tensor]:
        """Raw rows of the base and of every model, on the CPU, in their stored dtypes."""
        rows = chunk.rows
        out = [self.base.read(chunk.job.name, rows)]
        out += [m.read(chunk.job.name, rows) for m in self.models]
        nbytes = sum(t.numel() * t.element_size() for t in out)
        self.stats.bytes_read += nbytes
        self._progress(nbytes)
        return out

    def _stream(self, chunks: list[Chunk]) -> Iterator[tuple[Chunk, list[torch.Tensor]]]:
        """Yield (chunk, raw inputs), reading the next chunk on a thread while the caller computes."""
        if not chunks:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiesmerge-read") as pool:
            pending: Future = pool.submit(self._read, chunks[0])
            for i, chunk in enumerate(chunks):
                raw = pending.result()
                if i + 1 < len(chunks):
                    pending = pool.submit(self._read, chunks[i + 1])
                yield chunk, raw

    def _inputs(self, chunk: Chunk, raw: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(base32 (*S), models32 (n, *S)) float32 on the device, checked finite on first sight."""
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

    def _task_vectors(self, chunk: Chunk, raw: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(base32 (*S), tau (n, *S)) float32 on the device."""
        base32, models32 = self._inputs(chunk, raw)
        tau = models32.sub_(base32)  # (n, *S), in place: the models' values are not needed again
        if not bool(torch.isfinite(tau.sum())) and not bool(torch.isfinite(tau).all()):
            self._raise_not_finite(chunk, raw)
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
    def _select(self, chunks: list[Chunk], numel: int) -> torch.Tensor:
        assert self.trim is not None
        keep = ops.keep_count(numel, self.trim.density)
        selector = RadixSelect([keep] * self.n, self.device)
        while not selector.done:
            for chunk, raw in self._stream(chunks):
                if self._fused_select:
                    selector.add_counts(lambda hist, chunk=chunk, raw=raw: kernels.histogram_pass(
                        *self._inputs(chunk, raw), selector.stage, selector.chosen_high, hist))
                else:
                    selector.observe(self._task_vectors(chunk, raw)[1])
            selector.end_pass()
        return selector.thresholds().to(self.device)

    def _majority(self, chunks: list[Chunk], thresholds: torch.Tensor) -> float:
        total = 0.0
        for chunk, raw in self._stream(chunks):
            ctx = ChunkContext(thresholds=thresholds, weights=self.weights)
            total += self.method.elected_sign_sum(self._task_vectors(chunk, raw)[1], ctx)
        return float(torch.tensor(total).sign())

    def _select_in_memory(self, base32: torch.Tensor, models32: torch.Tensor, numel: int) -> torch.Tensor:
        """Thresholds of a per-tensor scope held in one chunk, from the fused histograms."""
        assert self.trim is not None
        selector = RadixSelect([ops.keep_count(numel, self.trim.density)] * self.n, self.device)
        while not selector.done:
            selector.add_counts(lambda hist: kernels.histogram_pass(base32, models32, selector.stage,
                                                                    selector.chosen_high, hist))
            selector.end_pass()
        return selector.thresholds()

    def _inline_thresholds(self, tau: torch.Tensor, numel: int) -> torch.Tensor:
        assert self.trim is not None
        keep = ops.keep_count(numel, self.trim.density)
        flat = tau.reshape(self.n, -1).abs()  # (n, numel)
        return torch.stack([kth_largest(flat[t], keep) for t in range(self.n)]).to(torch.float32)

    # ------------------------------------------------------------------ passes
    def run(self, sink: Sink) -> RunStats:
        merged_jobs = [j for j in self.alignment.jobs if j.merge]
        clock = time.perf_counter()
        thresholds = majority = None
        if self.trim is not None and self.trim.scope == "global":
            thresholds = self._select(self._chunks(merged_jobs), self.alignment.merged_numel())
            self.stats.thresholds = [float(x) for x in thresholds.cpu()]
            self.stats.seconds["select"] = time.perf_counter() - clock
            clock = time.perf_counter()
            if self.majority:
                majority = self._majority(self._chunks(merged_jobs), thresholds)
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
                sink.write(job.name, None, value)
                self.stats.tensors_copied += 1
            for alias in job.aliases:
                sink.alias(alias, job.name)
                self.stats.tensors_tied += 1
        self.stats.seconds["merge"] = time.perf_counter() - clock
        return self.stats

    def _merge_job(self, job: TensorJob, sink: Sink, thresholds: torch.Tensor | None, majority: float | None) -> None:
        chunks = list(self.plan.chunks_by_job[job.name])
        per_tensor = self.trim is not None and self.trim.scope == "per_tensor"
        if per_tensor and len(chunks) > 1:  # a per-tensor scope too large for one chunk: reduce first
            thresholds = self._select(chunks, job.numel)
            if self.majority:
                majority = self._majority(chunks, thresholds)
        stream = _stream_id(job.name)
        for chunk, raw in self._stream(chunks):
            if self._fused_ties and not self.majority:
                base32, models32 = self._inputs(chunk, raw)
                if per_tensor and len(chunks) == 1:
                    thresholds = self._select_in_memory(base32, models32, job.numel)
                merged32 = kernels.ties_merge_chunk(base32, models32, thresholds, self.weights, self.method.lam,
                                                    self.method.elect, self.method.zero_sign, majority,
                                                    self.method.aggregate)
                sink.write(job.name, chunk.rows, merged32.to(self.out_dtype or job.dtype))
                continue
            base32, tau = self._task_vectors(chunk, raw)
            chunk_thresholds, chunk_majority = thresholds, majority
            if per_tensor and len(chunks) == 1:
                chunk_thresholds = self._inline_thresholds(tau, job.numel)
                if self.majority:
                    ctx = ChunkContext(thresholds=chunk_thresholds, weights=self.weights)
                    chunk_majority = float(torch.tensor(self.method.elected_sign_sum(tau, ctx)).sign())
            ctx = ChunkContext(thresholds=chunk_thresholds, majority=chunk_majority, weights=self.weights,
                               stream=stream, offset=chunk.offset)
            delta = self.method.merge(tau, ctx)  # (*S) float32
            merged = base32.add_(delta).to(self.out_dtype or job.dtype)
            sink.write(job.name, chunk.rows, merged.cpu() if merged.device.type != "cpu" else merged)
