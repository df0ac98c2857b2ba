"""How far each model is from the base, measured on a sample before anything is merged.

A merge assumes every model was fine-tuned from the given base: τ = θ_model − θ_base is a small
change. A model trained from another pretraining run, or from another revision of the base,
gives a τ as large as the weights themselves, and merging it yields a broken model (mergekit's
"gibberish" reports). This module measures, per model and per merged tensor:

* the relative norm ``‖τ‖ / ‖θ_base‖`` (per tensor, and over the whole model, each tensor's
  sums scaled up by its size over the entries sampled);
* the cosine of ``θ_model`` and ``θ_base``, and the share of tensors that *barely match*:
  cosine below :data:`COSINE_FLOOR`.

A model is *distant* when its overall relative norm exceeds :data:`RELATIVE_NORM_LIMIT` or
more than :data:`SHARE_LIMIT` of its tensors barely match; a distant model is an error unless
``allow_distant``. The thresholds were calibrated on real pairs (benchmarks/base_distance.py,
results in benchmarks/results/base_distance.md): the MiniLM benchmark's 35 task fine-tunes, its
multitask model, rank-8 cuts of them, merges of them and a sibling fine-tune given as the base
measure at most 0.021 overall, no tensor below a cosine of 0.998; independently initialised
weights of the same config and the base with its layers rotated measure 0.99–1.05, with 72–87 %
of their tensors below a cosine of 0.5.

What is read: :data:`ROWS` evenly spaced rows of every merged tensor of rank ≥ 2 (one read
each), the first :data:`VECTOR_ENTRIES` entries of a vector, a scalar whole; of the base and of
each model. For MiniLM (22.7 M parameters, 90 MB) that is 3 MB of each model and of the base
(0.05 s a model, against 14 s for a TIES merge of eight); for a 7B Llama in bfloat16 about
37 MB of each, under 0.5 % of what the merge reads. Models with fewer than
:data:`MIN_PARAMETERS` merged parameters (toy and test models) are measured but not judged:
the calibration says nothing about them. PEFT adapters are not measured: their task vector is
defined against the base they were trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import IncompatibleCheckpointsError, InvalidTensorError
from .io.adapters import yields_task_vector
from .io.align import TensorJob
from .io.protocol import Checkpoint, read_rows_into, rows_shape

__all__ = ["TensorDistance", "ModelDistance", "measure", "check_distances", "RELATIVE_NORM_LIMIT", "COSINE_FLOOR",
           "SHARE_LIMIT", "MIN_PARAMETERS", "ROWS", "VECTOR_ENTRIES"]

RELATIVE_NORM_LIMIT = 0.5  # overall ‖τ‖/‖θ_base‖: fine-tunes measured ≤ 0.021, unrelated weights ≥ 0.99
COSINE_FLOOR = 0.5  # a tensor "barely matches" below this cosine: fine-tunes' tensors measured ≥ 0.998
SHARE_LIMIT = 0.25  # of tensors barely matching: fine-tunes measured 0 %, unrelated weights ≥ 72 %
MIN_PARAMETERS = 1_000_000  # fewer merged parameters: measured, not judged
ROWS = 16  # rows sampled per matrix
VECTOR_ENTRIES = 65536  # entries read of a vector (a prefix)
WHOLE_READ_BYTES = 1 << 20  # a matrix this small is read whole (one read, not 16) and its rows picked in memory


@dataclass(frozen=True)
class TensorDistance:
    name: str
    relative_norm: float
    cosine: float
    sampled: int  # entries compared


@dataclass(frozen=True)
class ModelDistance:
    index: int
    label: str
    relative_norm: float  # overall, estimated from the sample
    share_barely_matching: float
    tensors: tuple[TensorDistance, ...]
    parameters: int  # merged parameters the estimate stands for
    bytes_read: int  # of this model and the base, for the sample
    skipped: str | None = None  # why this model was not measured

    @property
    def judged(self) -> bool:
        return self.skipped is None and self.parameters >= MIN_PARAMETERS

    @property
    def distant(self) -> bool:
        return self.judged and (self.relative_norm > RELATIVE_NORM_LIMIT or self.share_barely_matching > SHARE_LIMIT)

    def worst(self) -> TensorDistance | None:
        return max(self.tensors, key=lambda t: (1 - t.cosine, t.relative_norm), default=None)

    def line(self) -> str:
        """One line for --dry-run and validate."""
        if self.skipped:
            return f"model {self.index}: not measured ({self.skipped})"
        verdict = ("DISTANT" if self.distant else "looks fine-tuned from the base") if self.judged else \
            f"not judged: {self.parameters:,} parameters, fewer than {MIN_PARAMETERS:,}"
        if self.tensors and self.relative_norm == 0.0:  # a copy of the base: it adds nothing but its weight
            verdict = "IDENTICAL to the base on every sampled row (a zero task vector: a copy of the base?)"
        return (f"model {self.index}: ‖τ‖/‖θ_base‖ {self.relative_norm:.4f}, "
                f"{self.share_barely_matching:.0%} of {len(self.tensors)} tensors barely match — {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.index, "label": self.label, "relative_norm": _finite(self.relative_norm),
                "share_barely_matching": self.share_barely_matching, "judged": self.judged,
                "distant": self.distant, "skipped": self.skipped, "parameters": self.parameters,
                "sample_bytes": self.bytes_read,
                "per_tensor": {t.name: {"relative_norm": _finite(t.relative_norm), "cosine": round(t.cosine, 6)}
                               for t in self.tensors}}


def _finite(x: float) -> float | str:
    return round(x, 6) if math.isfinite(x) else "inf"


def _rows_of(shape: tuple[int, ...]) -> list[slice | None]:
    if not shape:
        return [None]
    if len(shape) == 1:
        return [slice(0, min(shape[0], VECTOR_ENTRIES))]
    return [slice(int(r), int(r) + 1) for r in _picks(shape[0])]


def _picks(n_rows: int) -> np.ndarray:
    """The :data:`ROWS` evenly spaced rows sampled of a matrix of ``n_rows`` rows."""
    return np.unique(np.linspace(0, n_rows - 1, min(n_rows, ROWS)).round().astype(np.int64))


def _values(ckpt: Checkpoint, name: str, rows: Sequence[slice | None], pick: np.ndarray | None = None
            ) -> np.ndarray:
    """The given rows of a tensor, one after another, as float64 (stored bytes widened; torch only for dtypes
    numpy lacks); ``pick``: of what was read (a whole matrix), only these rows. Stored bytes are read into one
    buffer and only the rows kept are widened, at once: per-row widening, and widening whole matrices of which
    16 rows are kept, were most of the sample's time (0.3 s for a 0.2 B model's 147 tensors)."""
    info = ckpt.info(name)
    if info.dtype_info.code in ("BF16", "F16", "F32", "F64") and hasattr(ckpt, "read_into"):
        from .engine.reader import check_float32_range, widen

        sizes = [math.prod(rows_shape(info.shape, r)) * info.itemsize for r in rows]
        raw = np.empty(sum(sizes), np.uint8)
        view, at = memoryview(raw), 0
        for r, size in zip(rows, sizes, strict=True):
            read_rows_into(ckpt, name, r, view[at:at + size])
            at += size
        if pick is not None:  # (its rows, bytes of a row) -> the rows kept
            raw = np.ascontiguousarray(raw.reshape(info.shape[0], -1)[pick]).reshape(-1)
        if info.dtype_info.code == "F64":  # as stored; past float32's range it is refused as the merge would
            values = raw.view(np.float64)
            check_float32_range(ckpt.location(name), name, tuple(info.shape), values)
            return values
        return widen(raw.view(info.dtype_info.numpy), info.dtype_info).astype(np.float64)
    import torch  # a reader without read_into (or a dtype numpy lacks) holds torch tensors: torch is loaded

    parts = [ckpt.read(name, r) for r in rows]
    if pick is not None:
        parts = [parts[0][torch.from_numpy(pick)]]
    values = torch.cat([p.double().reshape(-1) for p in parts]).numpy()
    if parts[0].dtype == torch.float64:  # only float64 can hold finite values past float32's range
        from .engine.reader import check_float32_range

        check_float32_range(ckpt.location(name), name, tuple(info.shape), values)
    return values


def _sample(ckpt: Checkpoint, job: TensorJob) -> np.ndarray:
    """(S,) float64: the entries of tensor ``job`` that the distance compares (see the module's docstring).
    A matrix no larger than :data:`WHOLE_READ_BYTES` is read in one piece and its rows picked here: a
    model of 10^5 small tensors (a mixture of experts) would otherwise cost 16 reads a tensor, each
    mostly Python (2 ms a tensor in all, minutes before the merge started)."""
    shape = tuple(job.shape)  # the base's: a model may hold more rows (a vocabulary truncated to the base's)
    if not job.numel:
        return np.zeros(0)
    info = ckpt.info(job.name)
    if len(shape) >= 2 and math.prod(info.shape) * info.itemsize <= WHOLE_READ_BYTES:
        return _values(ckpt, job.name, [None], _picks(shape[0]))
    return _values(ckpt, job.name, _rows_of(shape))


def _check_finite(ckpt: Checkpoint, job: TensorJob, values: np.ndarray) -> None:
    """A NaN or Inf in the sample: the merge would refuse the tensor later (its engine checks every chunk); named now,
    so that --dry-run and validate say it too instead of printing a distance of inf."""
    if np.isfinite(values).all():
        return
    if hasattr(ckpt, "explain_not_finite"):  # an adapter's product, not its file, may have overflowed
        ckpt.explain_not_finite(job.name)
    kind = "NaN" if np.isnan(values).any() else "Inf"
    raise InvalidTensorError(
        f"{ckpt.location(job.name)}: tensor {job.name!r} {tuple(job.shape)} holds {kind} (found in the rows sampled "
        "to measure its distance from the base)",
        hint="the checkpoint is damaged or was saved after a diverged training step; merge another one")


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """a . b of two float64 vectors without BLAS: numpy's BLAS starts its threads for every product of more
    than a few thousand entries, and beside the kernels' threads (on 2 cores) that took 8 ms a product,
    3.7 s of a Model Stock merge's 5.6 s (einsum's own loop: microseconds)."""
    return float(np.einsum("i,i->", a, b))


@dataclass
class _Sums:
    """One model's running sums over the tensors measured so far."""

    tensors: list[TensorDistance]
    tau2: float = 0.0
    base2: float = 0.0
    nbytes: int = 0
    params: int = 0


def measure(base: Checkpoint, models: Sequence[Checkpoint], jobs: Sequence[TensorJob]) -> list[ModelDistance]:
    """Each model's distance from the base over the merged tensors ``jobs`` (see the module's docstring).
    Tensor by tensor: the base's sample is read once for all the models."""
    merged = [j for j in jobs if j.merge]
    measured = [k for k, model in enumerate(models) if not yields_task_vector(model)]
    sums = {k: _Sums([]) for k in measured}
    for job in merged if measured else ():
        b = _sample(base, job)
        if not b.size:
            continue
        _check_finite(base, job, b)
        b_sq = _dot(b, b)
        for k in measured:
            model, acc = models[k], sums[k]
            m = _sample(model, job)
            _check_finite(model, job, m)
            acc.nbytes += b.size * (base.info(job.name).itemsize + model.info(job.name).itemsize)
            m_sq, dot = _dot(m, m), _dot(b, m)
            t_sq = _dot(m - b, m - b)
            acc.params += job.numel
            scale = job.numel / b.size
            acc.tau2 += t_sq * scale
            acc.base2 += b_sq * scale
            rel = math.sqrt(t_sq / b_sq) if b_sq > 0 else (math.inf if t_sq > 0 else 0.0)
            cos = dot / math.sqrt(b_sq * m_sq) if b_sq > 0 and m_sq > 0 else (1.0 if b_sq == m_sq == 0 else 0.0)
            acc.tensors.append(TensorDistance(job.name, rel, max(-1.0, min(1.0, cos)), int(b.size)))
    out = []
    for k, model in enumerate(models):
        if k not in sums:
            out.append(ModelDistance(k, model.label, 0.0, 0.0, (), 0, 0,
                                     skipped="a PEFT adapter: its task vector is defined against the base"))
            continue
        acc = sums[k]
        overall = math.sqrt(acc.tau2 / acc.base2) if acc.base2 > 0 else (math.inf if acc.tau2 > 0 else 0.0)
        share = sum(t.cosine < COSINE_FLOOR for t in acc.tensors) / max(1, len(acc.tensors))
        out.append(ModelDistance(k, model.label, overall, share, tuple(acc.tensors), acc.params, acc.nbytes))
    return out


def check_distances(distances: Sequence[ModelDistance], base_label: str, allow_distant: bool) -> None:
    """A typed error for the first distant model, unless ``allow_distant``."""
    if allow_distant:
        return
    for d in distances:
        if not d.distant:
            continue
        # the tensor behind the verdict: the least aligned where tensors barely match, else the one changed most
        # (a +60000 norm weight made the distance, and a k_proj of cosine 0.88 was named: hostile pass 26, N6)
        worst = d.worst() if d.share_barely_matching > SHARE_LIMIT else \
            max(d.tensors, key=lambda t: (t.relative_norm, 1 - t.cosine), default=None)
        why = []
        if d.relative_norm > RELATIVE_NORM_LIMIT:
            why.append(f"its weights differ from the base's by {d.relative_norm:.3f} of the base's norm "
                       f"(‖τ‖/‖θ_base‖; the limit is {RELATIVE_NORM_LIMIT}, real fine-tunes measured at most 0.021)")
        if d.share_barely_matching > SHARE_LIMIT:
            why.append(f"{d.share_barely_matching:.0%} of its {len(d.tensors)} tensors barely match the base's "
                       f"(cosine under {COSINE_FLOOR}; the limit is {SHARE_LIMIT:.0%}, real fine-tunes measured 0 %)")
        if worst is not None:
            why.append(f"furthest tensor {worst.name!r}: relative norm {worst.relative_norm:.3f}, "
                       f"cosine {worst.cosine:.3f}")
        raise IncompatibleCheckpointsError(
            f"model {d.index} ({d.label}) does not look fine-tuned from the base ({base_label}): " + "; ".join(why)
            + ". It was likely trained from another pretraining run or another revision of the base, and merging "
              "it would give a broken model",
            hint="check --base (the model every other one was fine-tuned from); to merge distant models anyway, pass "
                 "--allow-distant (allow_distant=True; recipe key allow_distant: true)")
