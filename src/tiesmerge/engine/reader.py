"""Reading: every input's rows of each chunk, as stored, with the next chunk read ahead.

The inputs of a merge have roles (:class:`EngineInputs`): the base, the models, and named
extras: a reference model (TIES's ``sign_from``), and the real base when the engine's base
stands in for it (adapters merged against a zero base). A chunk's rows come either

* raw, for the fused CPU kernels (:class:`RawRows`): mapped from the page cache (private
  mmap, faulted in on the read-ahead thread, unmapped after the chunk) or read with pread
  into two reused buffers (``TIESMERGE_MMAP=0``, and rows under 1 MiB); or
* as torch tensors in the stored dtype, widened to float32 task vectors on the device by
  :meth:`Reader.task_vectors` for the torch path (any method, any device).

The reader also draws the seeded sample that brackets a global top-k threshold
(:meth:`Reader.sample`), and names the checkpoint, tensor and index of any NaN or Inf.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..dtypes import DType
from ..errors import InvalidTensorError
from ..io import leases
from ..io.adapters import yields_task_vector
from ..io.align import TensorJob
from ..io.checkpoint import Checkpoint, read_rows_into
from ..lazy import torch
from . import fused
from .plan import Chunk

__all__ = ["EngineInputs", "RawRows", "ChunkRows", "Reader", "widen", "SAMPLE_RUNS", "SAMPLE_RUN", "SAMPLE_GROUPS"]

_MAP_MIN_BYTES = 1 << 20  # rows smaller than this are read (a mapping costs a few syscalls)
SAMPLE_RUNS = 1024  # runs of neighbouring entries drawn to bracket a global threshold
SAMPLE_RUN = 1024  # entries per run: one short pread per input
SAMPLE_GROUPS = 32  # run groups whose quantiles measure the estimate's spread


@dataclass(frozen=True)
class EngineInputs:
    """The checkpoints a merge reads, by role; rows are read in the order of :attr:`all`."""

    base: Checkpoint  # what tau is taken against (a zero or identity base stands in for adapter outputs)
    models: tuple[Checkpoint, ...]
    reference: Checkpoint | None = None  # read beside the models: theta_ref - theta_base, never merged
    reference_base: Checkpoint | None = None  # the real base, where ``base`` stands in for it
    direct: frozenset[int] = field(init=False)  # models whose rows are task vectors already (adapters)

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "direct", frozenset(t for t, m in enumerate(self.models) if yields_task_vector(m)))

    @property
    def all(self) -> list[Checkpoint]:
        extras = [c for c in (self.reference, self.reference_base) if c is not None]
        return [self.base, *self.models, *extras]


def _mappable(ckpt: Checkpoint, name: str) -> bool:
    """Whether tensor ``name`` of ``ckpt`` may be read through a file mapping: a reader that maps, and whose file
    cannot be truncated under the mapping (a leased file: io/leases.py); otherwise it is read with pread."""
    return hasattr(ckpt, "map_rows") and (not hasattr(ckpt, "mappable") or ckpt.mappable(name))


@dataclass(frozen=True)
class RawRows:
    """One chunk's rows as stored: ``inputs`` holds each input's E raw values (the kernels'
    views, :data:`fused.RAW_VIEWS`), in reused buffers or in file mappings (a mapping is
    unmapped when the last view of it is dropped, after its chunk); ``shape`` and ``dtype``
    are the chunk's."""

    inputs: list[np.ndarray]
    dtype: DType
    shape: tuple[int, ...]

    def tensors(self) -> list[torch.Tensor]:
        """The same bytes as torch tensors in the stored dtype (no copy), in input order."""
        if self.dtype.code == "BF16":  # numpy has no bfloat16: its bits, viewed as torch's
            return [torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).view(self.shape) for a in self.inputs]
        return [torch.from_numpy(a.view(self.dtype.numpy)).view(self.shape) for a in self.inputs]


WIDENED = ("BF16", "F16", "F32", "F64")  # the stored floats :func:`widen` reads without torch


def widen(values: np.ndarray, dtype: DType) -> np.ndarray:
    """Stored values (raw bits or values) of a floating ``dtype`` in :data:`WIDENED` as float32:
    bfloat16's bits are a float32's high half; float16 and float64 are numpy's own."""
    if dtype.code not in WIDENED:
        raise TypeError(f"cannot widen {dtype.name} without torch")
    if dtype.code == "BF16":
        return (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype.code == "F16":
        return values.view(np.float16).astype(np.float32)
    with np.errstate(over="ignore"):  # float64 past float32's range becomes Inf: the callers name it (no warning line)
        return values.view(dtype.numpy).astype(np.float32, copy=False)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_float32_range(location: str, name: str, shape: tuple[int, ...], values: np.ndarray) -> None:
    """Refuse float64 ``values`` that are finite but past float32's range, which every merge computes in. ``values``
    may be a part of the tensor (a chunk, sampled rows): the count then says of how many it is (hp41 C26: merge said
    "1024 value(s)" of a tensor whose 4096 all were, where analyze, reading it whole, said 4096)."""
    with np.errstate(invalid="ignore"):
        over = np.isfinite(values) & (np.abs(values) > FLOAT32_MAX)
    if over.any():
        whole = math.prod(shape)
        counted = f"{int(over.sum()):,} value(s)" + (f" among the {values.size:,} read of its {whole:,}"
                                                      if values.size < whole else "")
        raise InvalidTensorError(
            f"{location}: tensor {name!r} {shape} holds float64 values beyond float32's range ({counted}, "
            f"the largest of magnitude {float(np.abs(values[over]).max()):.3g}; float32 holds at most "
            f"{FLOAT32_MAX:.3g}), and tiesmerge computes in float32",
            hint="these values are not weights a model can use; check how the checkpoint was made (or rescale it)")


@dataclass(frozen=True)
class ChunkRows:
    """One chunk as the torch path computes on it, float32 on the device."""

    base: torch.Tensor  # (*S) the engine base's values
    tau: torch.Tensor  # (n, *S) task vectors
    reference: torch.Tensor | None = None  # (*S) theta_ref - theta_base
    models: torch.Tensor | None = None  # (n, *S) the models' own values (Requirements.model_values)


class _Buffers:
    """Reusable byte buffers, grown on demand: two read slots and the output buffers.

    Reusing them means each pass faults its pages in once, not once per chunk, and the
    memory the budget pays for is exactly these buffers.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def take(self, key: str, nbytes: int) -> np.ndarray:
        array = self._arrays.get(key)
        if array is None or array.size < nbytes:
            self._arrays.pop(key, None)  # free the old one before allocating the larger
            array = self._arrays[key] = np.empty(max(nbytes, 64), np.uint8)
        return array[:nbytes]


def _settle(pending: Future) -> None:
    """Wait for a read ahead that already started; its error (if any) belongs to a chunk nobody asked for."""
    try:
        pending.result()
    except BaseException:  # noqa: BLE001 - the caller's own error is the one being raised
        pass


class Reader:
    """Reads chunks of every input (raw for the kernels where they can, else as tensors)."""

    def __init__(self, inputs: EngineInputs, *, raw: bool, device: torch.device | str = "cpu",
                 progress: Callable[[int], None] | None = None, tally: Callable[[str, float], None] | None = None
                 ) -> None:
        self.inputs = inputs
        self.n = len(inputs.models)
        self.device = device
        self.buffers = _Buffers()
        self.raw_wanted = raw and not inputs.direct  # adapters' rows are computed, never stored
        self._raw_ok: dict[str, bool] = {}
        self._mmap = os.environ.get("TIESMERGE_MMAP", "1") != "0"  # 0: read every chunk with pread
        self._progress = progress or (lambda nbytes: None)
        self._tally = tally or (lambda what, since: None)
        self._checked: set[tuple[str, int]] = set()
        self.bytes_read = 0
        self.sample_bytes = 0
        self._pool: ThreadPoolExecutor | None = None  # the read-ahead thread of a whole run (see :meth:`reading`)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """One read-ahead thread for every :meth:`stream` inside: a thread started per tensor cost
        0.3 ms each, 1.5 s of a merge of 5,000 small tensors (mixture-of-experts checkpoints hold 10^5)."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiesmerge-read") as pool:
            self._pool = pool
            try:
                yield
            finally:
                self._pool = None

    # ------------------------------------------------------------------ chunks
    def raw(self, job: TensorJob) -> bool:
        """Whether a job's rows go to the kernels as stored: every input holds it in one dtype they read."""
        ok = self._raw_ok.get(job.name)
        if ok is None:
            ok = self._raw_ok[job.name] = (
                self.raw_wanted and job.dtype_info.code in fused.RAW_VIEWS
                and all(c.info(job.name).dtype_info == job.dtype_info for c in self.inputs.all))
        return ok

    def read(self, chunk: Chunk, slot: int = 0) -> RawRows | list[torch.Tensor]:
        """The chunk's rows of every input, as stored: into read slot ``slot`` for the kernels,
        or as fresh CPU tensors for the torch path."""
        name, rows = chunk.job.name, chunk.rows
        inputs = self.inputs.all
        if self.raw(chunk.job):
            dtype = chunk.job.dtype_info
            view_dtype = fused.RAW_VIEWS[dtype.code]
            size = chunk.numel * dtype.itemsize
            shape = chunk.job.shape
            if rows is not None and shape:
                first, stop, _ = rows.indices(shape[0])
                shape = (max(0, stop - first), *shape[1:])
            if self._mmap and size >= _MAP_MIN_BYTES and all(_mappable(c, name) for c in inputs):
                # file mappings: the kernels read the page cache in place (no copy); unmapped
                # after the chunk, so they never pile up in RSS
                views = [ckpt.map_rows(name, rows).view(view_dtype) for ckpt in inputs]
                payload: RawRows | list[torch.Tensor] = RawRows(views, dtype, tuple(shape))
            else:
                buffer = self.buffers.take(f"read{slot}", size * len(inputs))
                for i, ckpt in enumerate(inputs):
                    read_rows_into(ckpt, name, rows, memoryview(buffer[i * size:(i + 1) * size]))
                typed = buffer.view(view_dtype).reshape(len(inputs), chunk.numel)
                payload = RawRows(list(typed), dtype, tuple(shape))
            nbytes = size * len(inputs)
        else:
            payload = [ckpt.read(name, rows) for ckpt in inputs]
            nbytes = sum(t.numel() * t.element_size() for t in payload)
        self.account(nbytes)
        return payload

    def read_whole(self, ckpt: Checkpoint, job: TensorJob) -> np.ndarray | torch.Tensor:
        """A whole tensor as stored (a tensor copied from the base): its bytes where the reader
        has them (numpy, no torch), else the checkpoint's tensor."""
        if hasattr(ckpt, "read_into"):
            value = np.empty(job.nbytes, np.uint8)
            ckpt.read_into(job.name, None, memoryview(value))
            value = value.view(job.dtype_info.numpy).reshape(job.shape)
        else:
            value = ckpt.read(job.name)
        self.account(job.nbytes)
        return value

    def account(self, nbytes: int) -> None:
        """Count bytes read (here, or by the caller for what it read itself) and report progress."""
        self.bytes_read += nbytes
        self._progress(nbytes)

    def stream(self, chunks: Sequence[Chunk]) -> Iterator[tuple[Chunk, RawRows | list[torch.Tensor]]]:
        """Yield (chunk, rows), reading the next chunk on a thread while the caller computes.

        The two read slots alternate: chunk i+1 is read into the slot chunk i-1 used, which
        the caller finished with when it asked for chunk i.
        """
        if not chunks:
            return
        with ExitStack() as stack:
            pool = self._pool or stack.enter_context(ThreadPoolExecutor(max_workers=1,
                                                                         thread_name_prefix="tiesmerge-read"))
            pending: Future = pool.submit(self.read, chunks[0], 0)
            try:
                for i, chunk in enumerate(chunks):
                    clock = time.perf_counter()
                    payload = pending.result()
                    self._tally("wait_read", clock)
                    leases.check()  # a leased input opened for writing elsewhere: stop before its rows are used
                    if i + 1 < len(chunks):
                        pending = pool.submit(self.read, chunks[i + 1], (i + 1) % 2)
                    yield chunk, payload
            finally:  # a caller that stops early (an error): the read ahead must not write a slot in use later
                pending.cancel() or _settle(pending)

    # ------------------------------------------------------------------ tensors
    @staticmethod
    def tensors(payload: RawRows | list[torch.Tensor]) -> list[torch.Tensor]:
        return payload.tensors() if isinstance(payload, RawRows) else payload

    def task_vectors(self, chunk: Chunk, payload: RawRows | list[torch.Tensor], *,
                     model_values: bool = False) -> ChunkRows:
        """The chunk as float32 on the device: the base, the task vectors (n, *S) and the
        reference's task vector, each checked finite on first sight of the chunk; with
        ``model_values`` also the models' own values (n, *S), before the base is subtracted."""
        raw = self.tensors(payload)
        n = self.n
        # copy=True: a float32 CPU base read from a state dict (or an mmap'd pickle) is the
        # caller's own tensor, and the merge adds into base32 in place; without the copy,
        # merging would overwrite the caller's base weights.
        base32 = raw[0].to(self.device, torch.float32, non_blocking=True, copy=True)
        tau = torch.empty((n, *base32.shape), dtype=torch.float32, device=self.device)
        for t, model_raw in enumerate(raw[1:1 + n]):
            tau[t].copy_(model_raw.to(self.device, non_blocking=True))  # widened to float32 in the copy
        key = (chunk.job.name, chunk.offset)
        if key not in self._checked:
            self._checked.add(key)
            # NaN and Inf survive a sum, so a finite sum proves every entry finite without a
            # mask as large as the chunk; only a non-finite sum (or an overflow) looks closer
            if not (bool(torch.isfinite(tau.sum())) and bool(torch.isfinite(base32.sum()))):
                if not (bool(torch.isfinite(tau).all()) and bool(torch.isfinite(base32).all())):
                    self.raise_not_finite(chunk, raw)
        models = tau.clone() if model_values else None  # (n, *S) as read: base + (model - base) can round
        for t in range(n):  # adapters yield tau itself; only full models subtract the base
            if t not in self.inputs.direct:
                tau[t].sub_(base32)
            elif models is not None:
                models[t].add_(base32)  # an adapter's model is base + its delta
        if not bool(torch.isfinite(tau.sum())) and not bool(torch.isfinite(tau).all()):
            self.raise_not_finite(chunk, raw)
        return ChunkRows(base32, tau, self._reference(chunk, raw, base32), models)

    def _reference(self, chunk: Chunk, raw: list[torch.Tensor], base32: torch.Tensor) -> torch.Tensor | None:
        """theta_ref - theta_base over the real base (the stand-in base is not it), or the
        reference's own rows where it is an adapter (they are tau already)."""
        if self.inputs.reference is None:
            return None
        reference = raw[1 + self.n].to(self.device, torch.float32, copy=True)  # (*S)
        if not yields_task_vector(self.inputs.reference):
            real_base = base32 if self.inputs.reference_base is None else raw[2 + self.n].to(self.device, torch.float32)
            reference.sub_(real_base)
        if not bool(torch.isfinite(reference.sum())) and not bool(torch.isfinite(reference).all()):
            self.raise_not_finite(chunk, raw)
        return reference

    def raise_not_finite(self, chunk: Chunk, raw: list[torch.Tensor]) -> None:
        for ckpt, value in zip(self.inputs.all, raw, strict=True):
            if hasattr(ckpt, "explain_not_finite") and not bool(torch.isfinite(value.float()).all()):
                ckpt.explain_not_finite(chunk.job.name)  # an adapter's product, not its file, may have overflowed
            if value.dtype == torch.float64:  # finite float64 values float32 cannot hold are not damage: say so
                check_float32_range(ckpt.location(chunk.job.name), chunk.job.name, tuple(chunk.job.shape),
                                    value.cpu().numpy())
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

    # ------------------------------------------------------------------ sampling
    def sample(self, chunks: Sequence[Chunk], numel: int) -> tuple[np.ndarray, np.ndarray]:
        """|tau| at ``SAMPLE_RUNS`` runs of ``SAMPLE_RUN`` neighbouring entries drawn uniformly
        over the scope made of ``chunks`` (seeded: the same merge draws the same runs):
        (n, S) float32, and each entry's run group (S,)."""
        jobs = list(dict.fromkeys(c.job for c in chunks))
        starts = np.cumsum([0] + [j.numel for j in jobs])  # flat offset of each job in the scope
        rng = np.random.default_rng(numel)
        picks = np.sort(rng.integers(0, numel, SAMPLE_RUNS))
        inputs = [self.inputs.base, *self.inputs.models]
        values = np.empty((len(inputs), SAMPLE_RUNS * SAMPLE_RUN), dtype=np.float32)
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
                picked = self._gather(ckpt, job, index)  # float32
                self.sample_bytes += len(index) * ckpt.info(job.name).itemsize
                values[i, filled:filled + len(index)] = picked
            groups[filled:filled + len(index)] = np.repeat(np.nonzero(which == j)[0] % SAMPLE_GROUPS, counts)
            filled += len(index)
        # |tau| per model: model - base, or an adapter's rows as they are (they are tau already)
        from_base = np.array([t not in self.inputs.direct for t in range(self.n)], np.float32)[:, None]
        sample = np.abs(values[1:, :filled] - from_base * values[0, :filled])  # (n, S)
        return np.nan_to_num(sample, nan=np.inf), groups[:filled]

    @staticmethod
    def _gather(ckpt: Checkpoint, job: TensorJob, index: np.ndarray) -> np.ndarray:
        """Entries ``index`` (flat) of a tensor, as float32: mapped (only the sampled pages are
        read) or read whole where the tensor is small; computed by torch for adapters."""
        info = ckpt.info(job.name)
        if info.dtype_info.code not in WIDENED:  # float8 and the like: torch widens them
            return ckpt.read(job.name).reshape(-1)[torch.from_numpy(index)].float().numpy()
        if _mappable(ckpt, job.name) and info.nbytes >= _MAP_MIN_BYTES:
            raw = ckpt.map_rows(job.name, None, populate=False)
        elif hasattr(ckpt, "read_into"):
            raw = np.empty(info.nbytes, np.uint8)
            ckpt.read_into(job.name, None, memoryview(raw))
        else:  # state dicts and adapters hold (or compute) torch tensors
            return ckpt.read(job.name).reshape(-1)[torch.from_numpy(index)].float().numpy()
        return widen(raw.view(info.dtype_info.numpy)[index], info.dtype_info)  # unmaps with ``raw``
