"""Runs a plan: the method's cuts and reductions, then the merge pass, chunk by chunk into a sink.

The executor only orchestrates. :mod:`.reader` reads every input's rows of each chunk (the
next chunk is read ahead on a thread while this one computes); :mod:`.reduce` computes what
the method declared it needs over a scope (top-k thresholds, sums such as TIES's majority
sign); the method's ``merge`` (or the fused kernel it declared) computes each chunk; a writer
thread hands the result to the sink. Nothing larger than a chunk is ever held.

Two ways to merge a chunk:

* the fused CPU kernels (numba, :mod:`.kernels`), when the method declares one and the rows
  are raw: they widen, subtract, trim, elect, merge and round to the output dtype in one
  pass over the stored rows, into one of two reused output buffers;
* the torch path (any device, any method): float32 task vectors ``(n, *S)`` on the device,
  with a :class:`~tiesmerge.methods.base.ChunkContext` holding what the method required.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn, Protocol

import numpy as np

from ..dtypes import DType, as_dtype
from ..errors import InvalidTensorError, MergeWarning, OutOfMemoryError, TiesMergeError, is_out_of_memory, memory_hint
from ..finite import NotFiniteError, check_copy_fits, check_finite, check_fits_float8, first_nonfinite
from ..io import leases
from ..io.align import Alignment, TensorJob
from ..io.protocol import rank_bound
from ..io.vocab_rows import is_part
from ..lazy import torch
from ..methods.base import ChunkContext, LinearKernel, MergeMethod, Requirements, TensorKernel, TiesKernel
from ..sizes import DEFAULT_MEMORY_BUDGET, parse_size
from . import aten, fused, whole
from .plan import Chunk, Plan, make_plan
from .reader import ChunkRows, EngineInputs, RawRows, Reader, widen
from .reduce import Reducer
from .side import SideInputs
from .weight_scale import LARGE_LAM, warn_if_weights_cancel

__all__ = ["Sink", "MemorySink", "RunStats", "Executor"]

EXACT_K_BYTES_PER_ENTRY = 17  # the fused exact-k selection's working bytes per entry and model (engine.exactk)


class Sink(Protocol):
    """Where merged chunks go. A chunk is a torch tensor, or (from the fused CPU path, which
    never imports torch) a numpy array of the stored bytes: the values, or a bfloat16's bits as
    uint16."""

    def write(self, name: str, rows: slice | None, chunk: torch.Tensor | np.ndarray) -> None: ...

    def alias(self, name: str, source: str) -> None: ...


class MemorySink:
    """Collects the merged model as a state dict; tied names share one tensor, as in a module."""

    def __init__(self, jobs: Iterable[TensorJob], out_dtype: DType | torch.dtype | None) -> None:
        self.state: dict[str, torch.Tensor] = {}
        # merged tensors are checked as a written output's are (finite.py): an overflow is an error
        # naming the tensor, never Inf handed back to the caller (or to a tuning evaluator)
        self._finite: dict[str, str] = {}
        out = as_dtype(out_dtype) if out_dtype is not None else None
        for job in jobs:
            dtype = job.output_dtype(out)
            try:
                self.state[job.name] = torch.empty(job.shape, dtype=dtype.torch)
            except (RuntimeError, MemoryError) as exc:  # torch's allocator's own error (hp42 C23: a raw RuntimeError)
                if not is_out_of_memory(exc):
                    raise
                size = math.prod(job.shape) * dtype.itemsize
                raise OutOfMemoryError(
                    f"tensor {job.name!r} {tuple(job.shape)} of the merged model ({size / 2**30:,.1f} GiB as "
                    f"{dtype.name}) cannot be allocated: a merge returned in memory holds every merged tensor",
                    hint="give an output folder (output=, -o), which is written shard by shard, or run with more "
                         "memory") from None
            if job.merge and dtype.code:
                self._finite[job.name] = dtype.code

    def write(self, name: str, rows: slice | None, chunk: torch.Tensor | np.ndarray) -> None:
        target = self.state[name]
        if isinstance(chunk, np.ndarray):  # stored bytes: viewed as the target's dtype, no copy
            chunk = torch.from_numpy(chunk.reshape(-1).view(np.uint8)).view(target.dtype)
        part = target if rows is None or target.dim() == 0 else target[rows]
        part.copy_(chunk.view(part.shape) if chunk.numel() == part.numel() else chunk)
        if name in self._finite:
            row = math.prod(target.shape[1:])  # elements per row: the offset the error names
            check_finite(name, part, self._finite[name], (rows.start or 0) * row if rows is not None else 0)

    def alias(self, name: str, source: str) -> None:
        self.state[name] = self.state[source]


def _check_copy_finite(job: TensorJob, value: np.ndarray | torch.Tensor, base: Any) -> None:
    """A floating tensor copied from the base (no model changes it: an adapter merge's untargeted
    tensors) holding NaN or Inf: an error, as the same value in a merged tensor is; the output would
    carry it silently. ``value``: the stored bytes (numpy) or a tensor, in the stored dtype."""
    where = first_nonfinite(value, job.dtype_info.code or "") if job.is_floating else None
    if where is None:
        return
    flat = value.reshape(-1)[where]
    raw = float(widen(np.asarray(flat).reshape(1), job.dtype_info)[0]) if isinstance(value, np.ndarray) else \
        float(flat)
    if is_part(job.name):  # the rows of tokens the models added: their mean, built in the output's dtype, is not
        # the base's (hp64a c48, c52: "the base checkpoint is damaged", of a model's row past float16)
        _refuse_added_rows(job, where, raw)
    where_from = base.location(job.name) if hasattr(base, "location") else "the base"
    raise InvalidTensorError(
        f"{where_from}: tensor {job.name!r} {tuple(job.shape)}, copied from the base into the output (no model "
        f"changes it), holds {'NaN' if raw != raw else 'Inf'} at element {where:,}",
        hint="the base checkpoint is damaged or was saved after a diverged training step; merge onto another copy")


def _refuse_added_rows(job: TensorJob, where: int, raw: float) -> NoReturn:
    name, _, rows = job.name.partition(" [union rows ")
    raise InvalidTensorError(
        f"tensor {name!r}, rows {rows.rstrip(']')} (the tokens the models added: each row the mean of the models that "
        f"have that token) holds {'NaN' if raw != raw else 'Inf'} at element {where:,} in "
        f"{job.dtype_info.name}: a model's row there is past that dtype's range, or not finite",
        hint="write a wider dtype (--dtype bfloat16 or float32; out_dtype in a mergekit recipe), and check that "
             "model's rows for those tokens")


def _cast_copy(job: TensorJob, value: np.ndarray | torch.Tensor, out: DType) -> torch.Tensor:
    """A floating tensor copied from the base, cast to the output dtype ``out`` after a range check.

    ``value``: (*S) as ``read_whole`` gives it, the stored bytes (numpy) or a tensor."""
    if isinstance(value, np.ndarray):  # stored bytes: reinterpreted as the stored dtype, no copy
        raw = torch.from_numpy(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
        value = raw.view(job.dtype_info.torch).reshape(job.shape)
    wide = value if value.dtype == torch.float64 else value.float()  # (*S)
    check_copy_fits(job.name, wide, out.torch)
    return wide.to(out.torch)


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
    fused_chunks: int = 0  # chunks merged by a fused kernel
    torch_chunks: int = 0  # chunks merged by the torch path
    reference_zero: bool = False  # said that the reference's task vector is 0, so the merge is the base (hp40b C51)


def _differ(a: np.ndarray, b: np.ndarray, block: int = 1 << 20) -> bool:
    """Whether two rows of raw values (E,) differ in any byte, block by block: the first differing block ends it,
    and no temporary is larger than a block."""
    a, b = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    if a.size != b.size:
        return True
    return any(not np.array_equal(a[s:s + block], b[s:s + block]) for s in range(0, a.size, block))


def _stream_id(name: str) -> int:
    """A stable 32-bit id of a tensor name (Python's hash() is salted per process)."""
    h = 2166136261
    for byte in name.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


@dataclass
class _Scope:
    """What the reductions found over one scope: cut thresholds (n,) per cut, finished sums."""

    cuts: dict[str, np.ndarray] = field(default_factory=dict)
    reduced: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: np.ndarray | None = None  # (n, E) uint8: the exact-k trim of a whole tensor, for the fused merge




def _warn_if_trim_keeps_nothing(req: Requirements, alignment: Alignment, n: int, method: str) -> bool:
    """A density so small that the trim keeps no entry of any scope makes the merge the base itself. That is the
    definition (k = 0 keeps nothing), so it runs, but never silently: ``--density 1e-6`` on a small model is a slip."""
    if req.trim is None or req.exact_k:  # mergekit's exact k keeps at least one entry per tensor
        return False
    sizes = [j.numel for j in alignment.jobs if j.merge]
    if not sizes:
        return False
    largest = sum(sizes) if req.scope == "global" else max(sizes)
    counts = req.trim.keep_counts(largest, n) if largest else []
    if largest and not any(counts):
        warnings.warn(MergeWarning(
            f"{method}: the density keeps no entry of any tensor (the largest trim scope holds {largest:,} entries), "
            f"so the merge is the base itself; a density of at least {_rounded_up(1 / largest):.3g} keeps one entry"),
            stacklevel=3)
        return True
    idle = [i for i, c in enumerate(counts) if c == 0]
    if idle and req.trim.densities is not None:  # one model's slip: the others still merge (hostile pass 24, N2)
        said = ", ".join(f"model {i} ({req.trim.densities[i]:g})" for i in idle[:5])
        warnings.warn(MergeWarning(
            f"{method}: the density of {said} keeps no entry of any tensor (the largest trim scope holds "
            f"{largest:,} entries), so {'that model adds' if len(idle) == 1 else 'those models add'} nothing to the "
            f"merge; a density of at least {_rounded_up(1 / largest):.3g} keeps one entry"), stacklevel=3)
    return False


def _warn_if_drop_keeps_nothing(method: MergeMethod, alignment: Alignment, n: int) -> bool:
    """DARE's random drop at a rate so close to 1 that less than one entry of all the models is expected to survive:
    the merge is then the base, as with a density that keeps nothing, and is said so."""
    drop_rate = getattr(method, "drop_rate", None)
    if not isinstance(drop_rate, float) or drop_rate >= 1.0:
        return False
    from ..methods.ops import dare_keep_probability

    entries = n * sum(j.numel for j in alignment.jobs if j.merge)
    expected = entries * dare_keep_probability(drop_rate)  # the draw's own (hp77a c04: 1 - drop_rate said 0.5 of
    # what kept 1.0 on average)
    if entries and expected < 1.0:
        # said in both spellings: tiesmerge's own DARE takes drop_rate, a mergekit recipe its complement density
        # (hp75a c29: a recipe's density 1e-10 was said as a drop_rate the recipe cannot hold)
        least = _rounded_up(1 / entries)
        warnings.warn(MergeWarning(
            f"{method.name}: drop_rate {drop_rate:.12g} (density {1 - drop_rate:.3g}) leaves {expected:.2g} of the "
            f"models' {entries:,} task-vector entries on average, so the merge is almost surely the base itself; a "
            f"drop_rate of at most {1 - least:.10g} (a density of at least {least:.3g}) keeps one on average"),
            stacklevel=3)
        return True
    return False


def _rounded_up(x: float, digits: int = 3) -> float:
    """``x`` rounded up to ``digits`` significant digits: the density suggested is never just below the one needed."""
    unit = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / unit) * unit


class Executor:
    def __init__(self, inputs: EngineInputs, alignment: Alignment, method: MergeMethod, *,
                 device: str | torch.device = "cpu", memory_budget: int = parse_size(DEFAULT_MEMORY_BUDGET),
                 out_dtype: DType | torch.dtype | str | None = None, progress: Callable[[int], None] | None = None,
                 use_kernels: bool = True, side: SideInputs | None = None) -> None:
        self.inputs, self.alignment, self.method = inputs, alignment, method
        self.req: Requirements = method.requirements()
        self.device = device  # "cpu" stays a string: the fused CPU path never imports torch
        self.out_dtype: DType | None = as_dtype(out_dtype) if out_dtype is not None else None
        self.n = len(inputs.models)
        self.stats = RunStats()
        on_cpu = (device if isinstance(device, str) else device.type).split(":")[0] == "cpu"
        kernels_on = use_kernels and fused.available() and on_cpu and not inputs.direct
        self.reader = Reader(inputs, raw=kernels_on, device=self.device, progress=progress, tally=self._tally)
        self.reducer = Reducer(self.reader, tally=self._tally)
        # the fused merge: a kernel the method declared, on rows that need nothing else
        # (a kernel reads the base's and the models' own rows: base_values and model_values methods may declare one)
        self._fused_merge = (kernels_on and self.req.kernel is not None and side is None
                             and inputs.reference is None)
        extra_inputs = len(inputs.all) - 1 - self.n
        extra_bytes = side.extra_bytes_per_entry() if side else 0
        banded = getattr(self.req.kernel, "band", None) is not None  # Breadcrumbs' band: selected like exact k
        if self._fused_merge and isinstance(self.req.kernel, TensorKernel):  # its float32 buffers, per entry
            extra_bytes += whole.scratch_bytes(self.req.kernel, self.n, 1)
        if self._fused_merge and (self.req.exact_k or banded):  # per model: float32 keys, 3 int32 positions, a mask
            extra_bytes += self.n * EXACT_K_BYTES_PER_ENTRY
        self.plan: Plan = make_plan(alignment, self.n, self.req, memory_budget=memory_budget, out_dtype=out_dtype,
                                    fused=self._fused_merge, extra_inputs=extra_inputs,
                                    extra_bytes_per_entry=extra_bytes,
                                    reserved_bytes=side.reserved_bytes() if side else 0)
        # a cause of "the merge is the base itself" said now: the general warning at the end would only repeat it
        self._said_base = _warn_if_trim_keeps_nothing(self.req, alignment, self.n, method.name)
        self._said_base = _warn_if_drop_keeps_nothing(method, alignment, self.n) or self._said_base
        anchor = getattr(method, "base_weight", None)  # average counting its base: the base's weight is not 0
        undivided = getattr(method, "normalize_weights", True) is False  # Σ w_i θ_i itself: not a mean
        if self.req.weights is not None and not any(self.req.weights):
            # (hp78a c36: a base-less mergekit linear, weights 1 and 0: "every model's weight is 0", of a weight 1;
            # hp79a c23: undivided, the merge is that model times its weight, not "that model itself")
            rescaled = bool(anchor) and undivided and anchor != 1  # the anchor times its weight, not itself
            scaled = f" times {anchor:g} (normalize_weights is off: nothing divides the sum)" if rescaled else " itself"
            warnings.warn(MergeWarning(
                f"{method.name}: every model's weight is 0 but the base's (base_weight {anchor:g}; in a base-less "
                f"mergekit linear, the first listed model), so the merge is that model{scaled}" if anchor else
                f"{method.name}: every model's weight is 0, so the merge is the base itself"), stacklevel=2)
            self._said_base = not rescaled
        elif undivided and anchor is not None:
            total = float(anchor) + sum(float(w) for w in self.req.weights or ())
            if not math.isclose(total, 1.0):  # said for flags and the API as for a mergekit recipe (hp79a c34)
                warnings.warn(MergeWarning(
                    f"{method.name} with normalize_weights off: the weights (base_weight {anchor:g} first; in a "
                    f"base-less mergekit linear, the first listed model's) sum to {total:.6g}, not 1, so the merge "
                    f"Σ w_i θ_i is the models' values scaled by about {total:.6g} (mergekit's linear with normalize: "
                    "false computes the same)"), stacklevel=2)
        lam = getattr(method, "lam", None)  # it scales the merged task vector
        if lam == 0:  # the base itself
            warnings.warn(MergeWarning(f"{method.name}: lam is 0, so the merge is the base itself"), stacklevel=2)
            self._said_base = True
        weights = self.req.weights if getattr(method, "weights_multiply", False) and self.req.weights else None
        if weights is None and self.req.weights and isinstance(lam, (int, float)):
            warn_if_weights_cancel(method, lam, self.req.weights)
        if isinstance(lam, (int, float)):  # finite, but far past every model (hp27 N3); lam 1 by weight 1000 (hp28 N1)
            k = max(range(len(weights)), key=lambda i: abs(weights[i])) if weights else None
            scale = abs(lam) * (abs(weights[k]) if weights and k is not None else 1.0)
            if scale > LARGE_LAM:
                said = f"lam = {lam:g}" if not weights or k is None else \
                    f"lam = {lam:g} times model {k}'s weight {weights[k]:g}"
                whose = "the merged task vector" if k is None else "its task vector"
                # the method's own grid and default, not TIES's for every method (hp88a c81)
                from ..methods.base import paper_grid

                grid = paper_grid(type(method)).get("lam")
                default = next((f.default for f in fields(method) if f.name == "lam"), None)
                usual = ", ".join(([f"{method.name} searches lam {min(grid):g} to {max(grid):g}"] if grid else [])
                                  + ([f"its default is {default:g}"] if isinstance(default, (int, float)) else []))
                warnings.warn(MergeWarning(
                    f"{method.name}: {said} scales {whose} {scale:g} times, far past every model"
                    + (f" ({usual})" if usual else "") + "; check the value"), stacklevel=2)
        self._changed = self._moved_inputs = False  # a merged delta not all zero / a task vector not all zero seen
        self._reference_moved = False  # a reference (sign_from) task vector not all zero seen (hp40b C51)
        self.side = side  # per-model statistics of data-aware methods (Fisher, RegMean)
        if side is not None:
            self.plan = side.adjust_plan(self.plan)
        self._weights: torch.Tensor | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending_write: Future | None = None
        self._out_slot = 0
        self.stats.engine = "fused CPU kernels (numba)" if kernels_on else "torch"

    # ------------------------------------------------------------------ bookkeeping
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

    def _chunks(self, jobs: Iterable[TensorJob]) -> list[Chunk]:
        return [c for job in jobs for c in self.plan.chunks_by_job[job.name]]

    # ------------------------------------------------------------------ context
    @property
    def weights(self) -> torch.Tensor | None:
        """The per-model weights (n,) float32 on the device, made when the torch path first asks."""
        if self._weights is None and self.req.weights is not None:
            self._weights = torch.tensor(self.req.weights, dtype=torch.float32, device=self.device)
        return self._weights

    def _context(self, chunk: Chunk, rows: ChunkRows, scope: _Scope) -> ChunkContext:
        """What the method declared it needs, for one chunk."""
        req, job = self.req, chunk.job
        on_device = {name: torch.from_numpy(t).to(self.device) for name, t in scope.cuts.items()}
        keep = None
        if req.exact_k:
            keep = torch.tensor(req.trim.keep_counts(job.numel, self.n, at_least_one=True), device=self.device)
        return ChunkContext(
            name=job.name, shape=job.shape, offset=chunk.offset, stream=_stream_id(job.name),
            thresholds=on_device.pop("trim", None), cuts=on_device, reduced=scope.reduced, weights=self.weights,
            keep=keep, statistics=self.side.read(chunk) if self.side is not None else None,
            reference=rows.reference, base=rows.base if req.base_values else None,
            models=rows.models if req.model_values else None,
            ranks=self._rank_bounds(job.name) if req.whole_tensors else None)

    def _rank_bounds(self, name: str) -> tuple[int | None, ...]:
        """Each model's structural bound on the rank of ``name``'s task vector (an adapter's r), or None."""
        return tuple(rank_bound(m, name) for m in self.inputs.models)

    # ------------------------------------------------------------------ reductions
    def _reduce_streamed(self, chunks: list[Chunk], numel: int) -> tuple[_Scope, int]:
        """Cuts then sums over a scope read from disk (the whole model, or a chunked tensor);
        with the number of passes over the scope that took."""
        scope, passes = _Scope(), 0
        for cut in self.req.all_cuts:
            if cut.name == "trim" and self.req.exact_k:
                continue  # exact k keeps counts, not thresholds
            scope.cuts[cut.name] = self.reducer.thresholds(chunks, numel, cut.top)
            passes += self.reducer.passes
        if self.req.reductions:
            scope.reduced = self.reducer.sums(chunks, self.req.reductions,
                                              lambda c, rows: self._context(c, rows, scope))
            passes += 1
        return scope, passes

    def _reduce_in_memory(self, chunk: Chunk, payload: RawRows | list[torch.Tensor]) -> _Scope:
        """Cuts then sums of a per-tensor scope held in one chunk."""
        scope = _Scope()
        rows = None if isinstance(payload, RawRows) and not self.req.reductions else \
            self.reader.task_vectors(chunk, payload)
        for cut in self.req.all_cuts:
            if not (cut.name == "trim" and self.req.exact_k):
                scope.cuts[cut.name] = self.reducer.thresholds_in_memory(chunk, payload, rows, cut.top)
        if self.req.exact_k and self._fused_merge and isinstance(payload, RawRows):
            # mergekit's exact k in torch.argsort's order, found without sorting (engine.exactk)
            clock = time.perf_counter()
            keep = self.req.trim.keep_counts(chunk.job.numel, self.n, at_least_one=True)
            kernels = fused.load()
            scratch = self.reader.buffers.take("exact_k", kernels.exact_k_scratch_bytes(self.n, chunk.numel))
            scope.masks = kernels.exact_k_masks(payload.inputs[:1 + self.n], keep, scratch)
            self._tally("exact_k", clock)
            if scope.masks is None:
                self.reader.raise_not_finite(chunk, payload.tensors())
        if self.req.reductions:
            partial = self.reducer.sums_of(rows, self.req.reductions, self._context(chunk, rows, scope))
            scope.reduced = self.reducer.finish(self.req.reductions, partial)
        return scope

    # ------------------------------------------------------------------ passes
    def run(self, sink: Sink) -> RunStats:
        try:
            return self._run_with_threads(sink)
        except NotFiniteError as exc:
            self._base_past_range(exc)
            raise
        except RuntimeError as exc:  # torch's allocator, or a thread's stack the address-space limit refused: the
            if not is_out_of_memory(exc):  # API's caller gets the typed error the command line prints (hp44 c10)
                raise
            raise OutOfMemoryError(f"ran out of memory ({str(exc)[:200]})",
                                   hint=memory_hint(self.plan.memory_budget)) from exc

    def _base_past_range(self, exc: NotFiniteError) -> None:
        """An overflow where the base's own value is already past the output dtype's range is said as that (hp47
        c66): read the one row of the base that holds the element, where the output tensor has the base's shape."""
        job = next((j for j in self.alignment.jobs if exc.tensor in (j.name, *j.aliases)), None)
        base = self.inputs.base
        if job is None or exc.element is None or exc.code not in ("F16", "BF16", "F32", "F64"):
            return
        try:
            shape = tuple(base.info(job.name).shape)
            if shape != tuple(job.shape) or not shape:
                return
            per_row = math.prod(shape[1:])
            row = base.read(job.name, slice(exc.element // per_row, exc.element // per_row + 1))  # (1, *S[1:])
            value = float(row.reshape(-1)[exc.element % per_row])
        except Exception:  # noqa: BLE001 - only a better message was at stake: the overflow's own error stands
            return
        top = 65504.0 if exc.code == "F16" else float(torch.finfo(torch.float32).max)
        if not math.isfinite(value) or abs(value) > top:
            exc.blame_the_base(value)

    def _run_with_threads(self, sink: Sink) -> RunStats:
        if self.reader.raw_wanted and fused.load() is None:  # numba installed but not importable: torch
            self.reader.raw_wanted = self._fused_merge = False
            self.stats.engine = "torch"
        with fused.torch_threads_kept(), fused.one_thread_when_tight(), self.reader.reading(), \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiesmerge-write") as writer:
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
        scope = _Scope()
        if self.req.scope == "global" and (self.req.all_cuts or self.req.reductions):
            scope, passes = self._reduce_streamed(self._chunks(merged_jobs), self.alignment.merged_numel())
            self.stats.passes += passes
            if "trim" in scope.cuts:
                self.stats.thresholds = [float(x) for x in scope.cuts["trim"]]
            self.stats.seconds["reduce"] = time.perf_counter() - clock
            clock = time.perf_counter()
        for job in self.alignment.jobs:
            if job.merge:
                self._merge_job(job, sink, scope)
                self.stats.tensors_merged += 1
            else:
                value = self.reader.read_whole(self.inputs.base, job)
                _check_copy_finite(job, value, self.inputs.base)
                if job.cast_on_copy(self.out_dtype):
                    value = _cast_copy(job, value, job.output_dtype(self.out_dtype))
                self._write(sink.write, job.name, None, value)
                self.stats.tensors_copied += 1
            for alias in job.aliases:
                self._write(sink.alias, alias, job.name)
                self.stats.tensors_tied += 1
        self.stats.passes += 1
        leases.check()  # the last chunk's inputs too: a file opened for writing meanwhile is no input to vouch for
        self.reducer.warn_ties_excess()  # over every scope: a per-tensor scope's too, said once
        if self.side is not None:
            self.side.warn_if_silent(self.method.name)
        # (a method run only for what it collects, as adapt's task-vector pass, returns zero deltas by design)
        if self._moved_inputs and not self._changed and not self._said_base \
                and not getattr(self.method, "collects_only", False):
            if self.inputs.reference is not None and not self._reference_moved:
                # the cause, not the options (hp40b C51: a copy of the base as sign_from was "the options keep nothing")
                warnings.warn(MergeWarning(
                    f"{self.method.name}: the reference model (sign_from) equals the base on every merged tensor: its "
                    "task vector is 0, so it elects no sign and the merge is the base itself (was a fine-tuned model "
                    "meant, e.g. a multitask one?)"), stacklevel=3)
                self.stats.reference_zero = True
            else:
                # written in another dtype: its rounding may be the cause (hp74a c38: a float32 merge's change
                # below float16's spacing)
                narrowed = self.out_dtype is not None and any(
                    j.merge and j.dtype_info.itemsize > self.out_dtype.itemsize for j in self.alignment.jobs)
                cause = (f"with these options the method keeps nothing, or its change is below {self.out_dtype.name}'s "
                         "spacing at the base's values: a wider output dtype (float32) keeps it" if narrowed else
                         "with these options the method keeps nothing")
                warnings.warn(MergeWarning(
                    f"{self.method.name}: the merge changed no entry of any tensor although the models differ from "
                    f"the base ({cause}), so the output is the base itself"), stacklevel=3)
        self.stats.seconds["merge"] = time.perf_counter() - clock
        self.stats.bytes_read = self.reader.bytes_read
        self.stats.sample_bytes = self.reader.sample_bytes
        return self.stats

    def _merge_job(self, job: TensorJob, sink: Sink, scope: _Scope) -> None:
        chunks = list(self.plan.chunks_by_job[job.name])
        per_tensor = self.req.scope == "per_tensor" and bool(self.req.all_cuts or self.req.reductions)
        if per_tensor and len(chunks) > 1:  # a per-tensor scope too large for one chunk: reduce first
            before = self.reader.bytes_read
            scope, _ = self._reduce_streamed(chunks, job.numel)  # passes over this tensor only
            self.stats.reduce_bytes += self.reader.bytes_read - before
        out_dtype = self.out_dtype or job.dtype_info
        for chunk, payload in self.reader.stream(chunks):
            chunk_scope = self._reduce_in_memory(chunk, payload) if per_tensor and len(chunks) == 1 else scope
            if isinstance(payload, RawRows) and self._fused_merge:
                self._out_slot ^= 1  # the other output buffer: the last chunk may still be being written
                clock = time.perf_counter()
                merged = self._fused_chunk(chunk, payload, chunk_scope, out_dtype, self._out_slot)
                self._tally("merge_kernel", clock)
                self.stats.fused_chunks += 1
                if not self._changed and not self.req.model_values:
                    self._watch_fused(payload, merged, out_dtype)
            else:
                rows = self.reader.task_vectors(chunk, payload, model_values=self.req.model_values)
                # whether this merge changes anything: watched until the first nonzero delta (one reduction a chunk
                # until then, usually the first chunk only); tau is looked at first, as merge may change it in place
                moved = not self._changed and bool(rows.tau.any())
                if not self._changed and rows.reference is not None and not self._reference_moved:  # before merge
                    self._reference_moved = bool(rows.reference.any())
                aten.hold_torch_threads()  # torch at the caller's count, wherever a numba kernel moved it
                delta = self._method_merge(job.name, rows, self._context(chunk, rows, chunk_scope))  # (*S) float32
                if not self._changed and not self.req.model_values:
                    # a change that survives the addition and the cast (lam 1e-30: a delta of 1e-32 rounds away)
                    self._changed = bool(delta.any()) and bool(
                        ((rows.base + delta).to(out_dtype.torch) != rows.base.to(out_dtype.torch)).any())
                    self._moved_inputs = self._moved_inputs or moved
                # model_values: merge returned the merged model itself, not a task vector
                merged = delta if self.req.model_values else rows.base.add_(delta)  # (*S) float32
                if out_dtype.code.startswith("F8"):  # the cast saturates: check the range before it
                    check_fits_float8(job.name, merged, out_dtype.torch, chunk.offset)
                merged = merged.to(out_dtype.torch)
                merged = merged.cpu() if merged.device.type != "cpu" else merged
                self.stats.torch_chunks += 1
            self._write(sink.write, job.name, chunk.rows, merged)

    def _method_merge(self, name: str, rows: ChunkRows, ctx: ChunkContext) -> torch.Tensor:
        """The method's ``merge`` on one chunk, checked: a method that is not tiesmerge's own (a plugin's) that
        raises, or returns another shape than the chunk's, is a MethodError naming it (hp42 C59: a (..., 1) result
        was broadcast over every column and written; C60: a plugin's ValueError was "a bug in tiesmerge")."""
        from ..errors import MethodError

        method = self.method
        where = f"{type(method).__module__}.{type(method).__qualname__}"
        ours = where.startswith("tiesmerge.")
        try:
            delta = method.merge(rows.tau, ctx)
        except TiesMergeError:
            raise
        except SystemExit as exc:  # hp45 c10: a plugin's sys.exit(3) ended the command with no word
            if ours:
                raise
            raise MethodError(f"method {method.name!r} ({where}) called sys.exit({exc.code!r}) on tensor {name!r}",
                              hint="the method is not tiesmerge's own: fix it or report it to its authors (a merge "
                                   "method returns its result, it never exits the process)") from None
        except Exception as exc:
            if ours:
                raise
            if is_out_of_memory(exc):  # named: the method's own allocation, not only the budget (hp46 c03c)
                raise OutOfMemoryError(f"method {method.name!r} ({where}) ran out of memory on tensor {name!r} "
                                       f"({type(exc).__name__}: {str(exc)[:200]})",
                                       hint=memory_hint(self.plan.memory_budget) + "; the method is not tiesmerge's "
                                       "own: it may ask for more than it needs") from exc
            raise MethodError(f"method {method.name!r} ({where}) raised {type(exc).__name__} on tensor {name!r}: "
                              f"{str(exc)[:300]}", hint="the method is not tiesmerge's own: fix it or report it to "
                                                        "its authors (--debug shows its traceback)") from exc
        except KeyboardInterrupt:  # Ctrl-C or a stop signal (or the method's own: it cannot be told apart)
            raise
        except BaseException as exc:  # GeneratorExit, a BaseException of its own: the method's, not a library's
            if ours:  # called by tiesmerge, blamed on an input (hp48 c28)
                raise
            raise MethodError(f"method {method.name!r} ({where}) raised {type(exc).__name__} on tensor {name!r}: "
                              f"{str(exc)[:300]}", hint="the method is not tiesmerge's own: fix it or report it to "
                                                        "its authors (a merge method raises an Exception, if any)"
                              ) from exc
        want = tuple(rows.tau.shape[1:])
        if isinstance(delta, torch.Tensor) and delta.dtype not in (torch.float32, torch.float64, torch.float16,
                                                                   torch.bfloat16):
            # an int64 result truncated every value; a float8 one failed in the finite check (hp46 c03b)
            raise MethodError(f"method {method.name!r} ({where}) returned {str(delta.dtype).removeprefix('torch.')} "
                              f"values for tensor {name!r}: a merge returns floating-point values (float32)",
                              hint="fix the method's merge(tau, ctx) to return a float tensor")
        if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != want:
            got = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
            raise MethodError(f"method {method.name!r} ({where}) returned {got} for tensor {name!r}, whose chunk is "
                              f"{want}: a merge returns one value per entry of the chunk",
                              hint="fix the method's merge(tau, ctx): tau is (models, *chunk) and the result (*chunk)")
        if delta.device != rows.tau.device or delta.layout != torch.strided:  # hp45 c09: a meta tensor failed later
            kind = delta.device.type if delta.device != rows.tau.device else str(delta.layout).removeprefix("torch.")
            raise MethodError(f"method {method.name!r} ({where}) returned a {kind} tensor for tensor {name!r}, whose "
                              f"chunk is a dense tensor on {rows.tau.device}: its values cannot be written",
                              hint="fix the method's merge(tau, ctx) to return a dense tensor on tau's device")
        if not ours and not bool(torch.isfinite(delta).all()) and bool(torch.isfinite(rows.tau).all()):
            # finite inputs, a NaN or Inf result: the method's, not an overflow the hint would blame on lam (c11)
            bad = int((~torch.isfinite(delta)).sum())
            raise MethodError(f"method {method.name!r} ({where}) returned {bad:,} non-finite value(s) (Inf or NaN) "
                              f"for tensor {name!r}, whose inputs are all finite",
                              hint="the method is not tiesmerge's own: fix it or report it to its authors")
        return delta

    def _watch_fused(self, raw: RawRows, merged: np.ndarray, out_dtype: DType) -> None:
        """The torch path's watch for a merge that changes nothing, on a fused chunk (until the first that changed):
        whether a model differs from the base here, and whether the output's bytes differ from the base's. Where the
        output is written in another dtype than stored, the base is cast to it first, block by block (hp74a c38: a
        float32 merge written in float16, its whole change below float16's spacing, was assumed changed: no word)."""
        base = raw.inputs[0]
        moved = any(_differ(row, base) for row in raw.inputs[1:1 + self.n])
        self._moved_inputs = self._moved_inputs or moved
        if not moved:
            return
        written = np.ascontiguousarray(merged).reshape(-1)
        if out_dtype.code == raw.dtype.code:
            self._changed = _differ(written, base)
            return
        stored = raw.tensors()[0].reshape(-1)  # (E,) in the stored dtype
        step = max(1, (1 << 20) // out_dtype.itemsize)  # entries a block
        written_bytes = written.view(np.uint8)
        self._changed = any(
            not np.array_equal(stored[s:s + step].to(out_dtype.torch).view(torch.uint8).numpy(),
                               written_bytes[s * out_dtype.itemsize:(s + step) * out_dtype.itemsize])
            for s in range(0, stored.numel(), step))

    def _fused_chunk(self, chunk: Chunk, raw: RawRows, scope: _Scope, out_dtype: DType, slot: int) -> np.ndarray:
        """One chunk through the method's fused kernel, into output buffer ``slot``: (*S) stored
        bytes of ``out_dtype`` (numpy; a bfloat16's bits as uint16)."""
        kernels = fused.load()
        direct = out_dtype.code in fused.OUT_VIEWS  # bfloat16 and float32 are written by the kernel
        view = fused.OUT_VIEWS[out_dtype.code] if direct else np.dtype(np.float32)
        target = self.reader.buffers.take(f"out{slot}", chunk.numel * view.itemsize).view(view)
        spec = self.req.kernel
        inputs = raw.inputs[:1 + self.n]
        masks = scope.masks
        if getattr(spec, "band", None) is not None:  # Breadcrumbs: each model's band of the whole tensor
            clock = time.perf_counter()
            bounds = [spec.band.positions(chunk.numel)] * self.n
            scratch = self.reader.buffers.take("exact_k", kernels.exact_k_scratch_bytes(self.n, chunk.numel))
            masks = kernels.band_masks(inputs, bounds, scratch)
            self._tally("band", clock)
            if masks is None:
                self.reader.raise_not_finite(chunk, raw.tensors())
        if isinstance(spec, TensorKernel):  # SLERP, NuSLERP, Model Stock: reductions, then one pass
            clock = time.perf_counter()
            finite = whole.merge(spec, chunk.job.name, inputs, target, self.reader.buffers.take)
            self._tally("whole_tensor", clock)
        elif isinstance(spec, TiesKernel):
            w = np.ones(self.n, np.float32) if self.req.weights is None else np.asarray(self.req.weights, np.float32)
            fill = float(scope.reduced[spec.majority_from]) if spec.majority_from else None
            dare = None
            if spec.dare is not None:  # counter-based: model t's stream at the chunk's flat offset
                drop, seed = spec.dare
                dare = (kernels.dare_keys(seed, _stream_id(chunk.job.name), self.n), drop, chunk.offset)
            finite = kernels.ties_merge(inputs, scope.cuts.get("trim"), w, spec.lam, spec.elect, spec.zero_sign, fill,
                                        spec.aggregate, target, masks, dare)
        else:
            assert isinstance(spec, LinearKernel)
            coef = None if spec.coefficients is None else np.asarray(spec.coefficients, np.float32)
            if spec.base_coefficient is not None:  # the models' own values, the base among them (mergekit's linear)
                coef = np.asarray((spec.base_coefficient, *spec.coefficients), np.float32)
                finite = kernels.values_mean(inputs, coef, spec.divisor, target)
            elif spec.mean:  # the torch path's mean: sum / n
                finite = kernels.linear_merge(inputs, coef, float(self.n), 2, target, masks)
            elif spec.divisor is not None:
                finite = kernels.linear_merge(inputs, coef, spec.scale, 3, target, masks, spec.divisor)
            else:
                finite = kernels.linear_merge(inputs, coef, spec.scale, 1, target, masks)
        if not finite:
            self.reader.raise_not_finite(chunk, raw.tensors())
        target = target.reshape(raw.shape)
        # float16 and float64 outputs: numpy's casts round as torch's do (to nearest, ties to even). A value past
        # float16's range becomes Inf quietly here: the output's finiteness check names the tensor and says what to do
        if direct:
            return target
        with np.errstate(over="ignore", invalid="ignore"):
            return target.astype(out_dtype.numpy)
