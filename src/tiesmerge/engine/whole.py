"""Fused whole-tensor merges (SLERP, NuSLERP, Model Stock): reductions in torch's order, then one elementwise pass.

These methods interpolate with scalars that depend on the whole tensor (norms, cosines). To merge
bit for bit as their torch path (and so as mergekit 0.1.5), the scalars must come from the same
float32 reductions in the same order. The method's ``coefficients(name, reductions)`` asks
:class:`Reductions` for them: the 2-norms and the sums of products its torch path would compute
(``torch.linalg.vector_norm``, ``torch.sum``), per tensor or per span of entries, and does the
rest of its arithmetic (on a few float32 scalars) with :class:`Numerics`: numpy's float32
operations (IEEE, as torch's) and torch's own sum, norm, acos and sin.

:class:`TorchOrder` computes those reductions straight from the raw rows in one pass each, with
ATen's own CPU order (:func:`kernels.torch_norms`, :func:`kernels.torch_sums`: 8-lane norms, the
4-level cascade sum, the split of a sum across torch's threads, whose per-thread results torch itself
adds): no float32 copy of any tensor is made, and torch is not imported (engine.aten: its thread
count and its acos and sin come from its library). Whether that is torch's order on this machine is
checked against torch on a few random rows (:func:`torch_order_ok`) and remembered per machine and
torch build; where it does not hold (another torch build or vector width), :class:`Materialised`
widens the values into reused float32 buffers and lets torch reduce them, as before. The
elementwise pass (:func:`kernels.interp`, :func:`kernels.stock`) reads the raw rows again and
writes the output dtype directly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import numpy as np

from ..lazy import torch
from ..methods.base import TensorKernel
from . import aten, fused

__all__ = ["merge", "prepare", "scratch_bytes", "Reductions", "Numerics", "TorchOrder", "Materialised",
           "torch_order_ok"]

GRAIN = 32768  # at::internal::GRAIN_SIZE: a sum this long or longer is split across torch's threads
_CALIBRATED: dict[int, bool] = {}  # torch thread count -> TorchOrder reproduces torch's reductions here


def scratch_bytes(spec: TensorKernel, n_models: int, numel: int) -> int:
    """The float32 buffers one tensor of ``numel`` entries may need (:class:`Materialised`, where
    torch's order is not confirmed): the two endpoints and their products ("interp"), or every
    model's task vector and one product ("stock"). :class:`TorchOrder` needs none."""
    return 4 * numel * (3 if spec.kind == "interp" else n_models + 1)


class Numerics:
    """torch's float32 results for the few operations a method's scalar arithmetic needs beyond IEEE's +, -,
    *, / and comparisons (which numpy's float32 computes as torch does): on 1-D float32 arrays."""

    def sum(self, x: np.ndarray) -> np.float32:
        """torch.sum(x)."""
        raise NotImplementedError

    def norm(self, x: np.ndarray) -> np.float32:
        """torch.linalg.vector_norm(x)."""
        raise NotImplementedError

    def acos(self, x: np.ndarray) -> np.ndarray:
        """torch.acos(x)."""
        raise NotImplementedError

    def sin(self, x: np.ndarray) -> np.ndarray:
        """torch.sin(x)."""
        raise NotImplementedError


class TorchNumerics(Numerics):
    """torch itself, at ``threads`` (default: the merge's pinned count): a numba kernel run before may have moved
    torch's count."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def sum(self, x: np.ndarray) -> np.float32:
        aten.hold_torch_threads(self.threads)
        return np.float32(torch.from_numpy(np.ascontiguousarray(x, np.float32)).sum().item())

    def norm(self, x: np.ndarray) -> np.float32:
        aten.hold_torch_threads(self.threads)
        return np.float32(torch.linalg.vector_norm(torch.from_numpy(np.ascontiguousarray(x, np.float32))).item())

    def acos(self, x: np.ndarray) -> np.ndarray:
        return torch.acos(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()

    def sin(self, x: np.ndarray) -> np.ndarray:
        return torch.sin(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


class EmulatedNumerics(Numerics):
    """Without torch: the kernels' emulation of ATen's reductions, and acos and sin from torch's library
    (engine.aten). Valid where :func:`torch_order_ok` confirmed it."""

    def __init__(self) -> None:
        self.kernels = fused.load()

    def sum(self, x: np.ndarray) -> np.float32:
        return aten_sum(self.kernels, x)

    def norm(self, x: np.ndarray) -> np.float32:
        x = np.ascontiguousarray(x, np.float32)
        return np.float32(self.kernels.torch_norms([x], np.zeros(1, np.int64), False, np.zeros(1, np.int64),
                                                   np.array([x.size]))[0])

    def acos(self, x: np.ndarray) -> np.ndarray:
        return aten.vector_math("acos")(x)

    def sin(self, x: np.ndarray) -> np.ndarray:
        return aten.vector_math("sin")(x)


def aten_sum(kernels, x: np.ndarray) -> np.float32:
    """torch.sum of a 1-D float32 array as ATen adds it (split over torch's threads past GRAIN entries)."""
    x = np.ascontiguousarray(x, np.float32)
    ranges = thread_ranges(x.size, aten.num_threads() or 1)
    # x * 1 is x exactly: the kernels' sum of products is torch.sum's order over x itself
    parts = kernels.torch_sums([x, np.ones(x.size, np.float32)], np.zeros(len(ranges), np.int64),
                               np.ones(len(ranges), np.int64), False, None,
                               np.array([a for a, _ in ranges]), np.array([b for _, b in ranges]))
    if len(ranges) == 1:
        return np.float32(parts[0])
    return aten_sum(kernels, parts)  # torch adds its threads' results with the same (serial) sum


class Reductions:
    """The reductions of one tensor's values a whole-tensor method asks for. Operand ``i``: the
    interpolation's endpoint i ("interp": inputs ``pair[i]``) or fine-tune i ("stock"), its values
    or (``relative``) its task vector, float32 as the torch path widens them."""

    operands: list[int]  # operand i is input operands[i] (0 the base, 1 + t model t)
    finite: bool  # False once a value read was not finite
    numerics: Numerics  # for the rest of the method's scalar arithmetic

    def norms(self, i: int, span: int | None = None) -> np.ndarray:
        """(S,) float32: torch.linalg.vector_norm of operand i's values, of each ``span`` entries (None: all)."""
        raise NotImplementedError

    def sums(self, i: int, j: int, scales: tuple[float, float] | None = None, span: int | None = None
             ) -> np.ndarray:
        """(S,) float32: torch.sum of (v_i / s_i) * (v_j / s_j) (``scales``, float32) or v_i * v_j, per span."""
        raise NotImplementedError

    def pair_sums(self, pairs: Sequence[tuple[int, int]]) -> list[np.float32]:
        """torch.sum of v_i * v_j over the whole tensor, for each pair (i, j)."""
        return [self.sums(i, j)[0] for i, j in pairs]


def _spans(numel: int, span: int | None) -> list[tuple[int, int]]:
    step = span or numel
    return [(s, min(numel, s + step)) for s in range(0, numel, step)]


class TorchOrder(Reductions):
    """Reductions in ATen's order, computed by the kernels from the raw rows (no float32 copies)."""

    def __init__(self, inputs: Sequence[np.ndarray], operands: Sequence[int], relative: bool,
                 take: Callable[[str, int], np.ndarray] | None = None) -> None:
        self.kernels = fused.load()
        self.inputs, self.operands, self.relative = inputs, list(operands), relative
        self.numel = inputs[0].size
        self.threads = aten.num_threads() or 1
        self.numerics = EmulatedNumerics()
        self.finite = True
        self._take = take or (lambda key, nbytes: np.empty(nbytes, np.uint8))
        self._norms: dict[int | None, np.ndarray] = {}  # span -> (operands, spans) norms

    def norms(self, i: int, span: int | None = None) -> np.ndarray:
        if span not in self._norms:  # every operand's at once: one job per (operand, span), in parallel
            spans = _spans(self.numel, span)
            k = len(self.operands)
            out = self.kernels.torch_norms(self.inputs, np.repeat(self.operands, len(spans)), self.relative,
                                           np.tile([s for s, _ in spans], k), np.tile([e for _, e in spans], k))
            self._norms[span] = out.reshape(k, len(spans))
            for j in range(k):
                if not np.isfinite(self._norms[span][j]).all():  # a value not finite, or squares that overflow?
                    scratch = self._take("whole.check", 4 * self.numel).view(np.float32)
                    self.finite = self.finite and self.kernels.values(self.inputs, self.operands[j], self.relative,
                                                                      scratch)
        return self._norms[span][i].copy()

    def sums(self, i: int, j: int, scales: tuple[float, float] | None = None, span: int | None = None
             ) -> np.ndarray:
        return self._sums([(i, j)], scales, span)[0]

    def pair_sums(self, pairs: Sequence[tuple[int, int]]) -> list[np.float32]:
        # every pair's jobs in one parallel call: Model Stock's three pairs keep both cores busy together
        return [out[0] for out in self._sums(pairs, None, None)]

    def _sums(self, pairs: Sequence[tuple[int, int]], scales: tuple[float, float] | None, span: int | None
              ) -> list[np.ndarray]:
        spans = _spans(self.numel, span)
        jobs, slots = [], []  # one job per (pair, span, torch thread); slots: where each lands
        for p, (i, j) in enumerate(pairs):
            for k, (s, e) in enumerate(spans):
                for slot, (a, b) in enumerate(thread_ranges(e - s, self.threads)):
                    jobs.append((self.operands[i], self.operands[j], s + a, s + b))
                    slots.append((p, k, slot))
        n = len(jobs)
        scale = None if scales is None else (np.full(n, scales[0], np.float32), np.full(n, scales[1], np.float32))
        parts = self.kernels.torch_sums(self.inputs, np.array([job[0] for job in jobs]),
                                        np.array([job[1] for job in jobs]), self.relative, scale,
                                        np.array([job[2] for job in jobs]), np.array([job[3] for job in jobs]))
        per_thread = np.zeros((len(pairs), len(spans), self.threads), np.float32)
        for (p, k, slot), value in zip(slots, parts, strict=True):
            per_thread[p, k, slot] = value
        outs = []
        for p in range(len(pairs)):
            out = np.empty(len(spans), np.float32)
            for k, (s, e) in enumerate(spans):
                # torch's two-pass reduction adds its threads' results with the same sum (a serial one)
                out[k] = aten_sum(self.kernels, per_thread[p, k]) if split(e - s, self.threads) else per_thread[p, k, 0]
            outs.append(out)
        return outs


def split(numel: int, threads: int) -> bool:
    """Whether torch.sum of ``numel`` contiguous entries runs as a two-pass reduction over its threads."""
    return numel >= GRAIN and threads > 1


def thread_ranges(numel: int, threads: int) -> list[tuple[int, int]]:
    """The ranges torch's threads sum (at::parallel_for with GRAIN_SIZE, OpenMP's even split), in
    slot order; one range where the sum is not split."""
    if not split(numel, threads) or numel <= GRAIN:
        return [(0, numel)]
    used = min(threads, -(-numel // GRAIN))
    size = -(-numel // used)
    return [(t * size, min(numel, (t + 1) * size)) for t in range(used) if t * size < numel]


class Materialised(Reductions):
    """Reductions by torch itself, on the values widened into reused float32 buffers (the fallback)."""

    def __init__(self, inputs: Sequence[np.ndarray], operands: Sequence[int], relative: bool,
                 take: Callable[[str, int], np.ndarray]) -> None:
        self.kernels = fused.load()
        self.numel = inputs[0].size
        self.operands = list(operands)
        self.numerics = TorchNumerics()
        self.finite = True
        self.values: list[np.ndarray] = []
        for k, which in enumerate(operands):
            buf = take(f"whole.v{k}", 4 * self.numel).view(np.float32)
            self.finite = self.finite and self.kernels.values(inputs, which, relative, buf)
            self.values.append(buf)
        self.product = take("whole.product", 4 * self.numel).view(np.float32)

    def norms(self, i: int, span: int | None = None) -> np.ndarray:
        aten.hold_torch_threads()  # the kernels that widened the values may have moved torch's count
        x = torch.from_numpy(self.values[i]).reshape(1, -1)
        return torch.stack([torch.linalg.vector_norm(x[:, s:e], dim=1) for s, e in _spans(self.numel, span)]
                           ).reshape(-1).numpy()

    def sums(self, i: int, j: int, scales: tuple[float, float] | None = None, span: int | None = None
             ) -> np.ndarray:
        if scales is None:
            self.kernels.product(self.values[i], self.values[j], self.product)
        else:
            self.kernels.product(self.values[i], self.values[j], self.product, *scales)
        aten.hold_torch_threads()
        p = torch.from_numpy(self.product).reshape(1, -1)
        return torch.stack([p[:, s:e].sum(dim=1) for s, e in _spans(self.numel, span)]).reshape(-1).numpy()


def torch_order_ok() -> bool:
    """Whether :class:`TorchOrder` and :class:`EmulatedNumerics` reproduce torch bit for bit in this process, at
    torch's current thread count. Remembered per machine and torch build (engine.aten.verdict): then torch
    is not imported at all. Otherwise checked against torch (imported now) on random rows whose lengths take
    every branch (the scalar path, the tails, one thread and the split across threads), on short vectors,
    and on acos and sin; the verdict is remembered where torch's thread count is its default."""
    if "torch" not in sys.modules:
        known = aten.verdict()
        if known is not None and aten.count_agrees(known[1]):
            return known[0]
        fresh = True  # imported just below: its thread count is its default
    else:
        fresh = False
    threads = torch.get_num_threads()
    aten.pin_threads(threads)  # inside a merge: its sums split over this count, the one checked here
    known = _CALIBRATED.get(threads)
    if known is None:
        known = _CALIBRATED[threads] = _matches_torch()
        if fresh:
            aten.remember_verdict(known, threads)
    return known


def _matches_torch() -> bool:
    kernels = fused.load()
    if kernels is None or aten.library() is None:
        return False
    threads = torch.get_num_threads()
    if aten.library()._ZN2at15get_num_threadsEv() != threads:  # the library loaded is not this torch's
        return False
    g = torch.Generator().manual_seed(12)
    for numel, stored in ((5, "bf16"), (77, "bf16"), (1029, "f32"), (GRAIN, "bf16"), (GRAIN + 77, "f32"),
                          (3 * GRAIN + 5, "bf16"), (13, "f32"), (6, "f32")):  # small: this runs once per machine
        aten.hold_torch_threads(threads)  # the previous round's kernels may have moved torch's count
        rows = [torch.randn(numel, generator=g) * (1 + torch.rand(numel, generator=g)) for _ in range(3)]
        if stored == "bf16":
            rows = [r.bfloat16() for r in rows]
        raw = [r.view(torch.int16).numpy().view(np.uint16) if stored == "bf16" else r.numpy() for r in rows]
        x, y = rows[1].float() - rows[0].float(), rows[2].float() - rows[0].float()
        order = TorchOrder(raw, (1, 2), relative=True)
        nx = torch.linalg.vector_norm(x.reshape(1, -1), dim=1)
        scaled = ((x / nx) * (y / 3.0)).sum()
        if not (np.array_equal(order.norms(0), nx.numpy())
                and np.array_equal(order.sums(0, 1), (x * y).sum().reshape(1).numpy())
                and np.array_equal(order.sums(0, 1, (float(nx), 3.0)), scaled.reshape(1).numpy())):
            return False
    ours, theirs = EmulatedNumerics(), TorchNumerics(threads)  # outside a merge no count is pinned
    # the short reductions of the scalar arithmetic (float32 values: a fused multiply-add rounds differently)
    for numel in (*list(range(1, 41)) * 8, 67, 130, 1000, 5000, GRAIN + 3):
        v = (torch.randn(numel, generator=g) * torch.rand(numel, generator=g).mul(30).sub(15).exp2()).numpy()
        if ours.sum(v) != theirs.sum(v) or ours.norm(v) != theirs.norm(v):
            return False
    cos = torch.cat([torch.rand(4000, generator=g) * 2 - 1, torch.tensor([-1.0, 0.0, 1.0, 0.9995, -0.9995])]).numpy()
    angles = torch.cat([torch.rand(4000, generator=g) * 3.1416, torch.randn(1000, generator=g) * 40]).numpy()
    return (np.array_equal(ours.acos(cos), theirs.acos(cos)) and np.array_equal(ours.sin(angles), theirs.sin(angles))
            and all(ours.acos(cos[k:k + 1])[0] == theirs.acos(cos[k:k + 1])[0] for k in range(0, 4000, 97)))


def prepare(spec: object) -> None:
    """Before a merge whose fused kernel is ``spec`` (a method's ``Requirements.kernel``): where its scalars will
    take torch's acos and sin from torch's library (an "interp" kernel) and the emulation is known to hold here,
    start loading the library now, beside the merge's preparation (nothing to do where torch is imported already
    or no whole-tensor kernel runs)."""
    if not isinstance(spec, TensorKernel) or spec.kind != "interp" or "torch" in sys.modules:
        return
    known = aten.verdict()
    if known is not None and known[0]:
        aten.preload()


def merge(spec: TensorKernel, name: str, inputs: Sequence[np.ndarray], out: np.ndarray, take) -> bool:
    """Merge one whole tensor ``name`` (inputs: the raw rows, base first) into ``out`` (bfloat16 bits or
    float32); ``take(key, nbytes)`` lends reused byte buffers. False when a value is not finite."""
    kernels = fused.load()
    numel = inputs[0].size
    if numel == 0:
        return True
    if spec.kind == "interp":
        operands, relative = spec.pair, spec.relative
    elif spec.kind == "stock":
        operands, relative = range(1, len(inputs)), True
    else:
        raise ValueError(f"unknown whole-tensor kernel {spec.kind!r}")
    reductions = TorchOrder(inputs, operands, relative, take) if torch_order_ok() else \
        Materialised(inputs, operands, relative, take)
    if not reductions.finite:
        return False
    scalars = spec.coefficients(name, reductions)
    if not reductions.finite:
        return False
    if spec.kind == "interp":
        c0, c1, divisor = scalars
        kernels.interp(inputs, spec.pair, spec.relative, c0, c1, divisor, out)
    else:
        t, one_minus_t = scalars
        kernels.stock(inputs, t, one_minus_t, out)
    return True
