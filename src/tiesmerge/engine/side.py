"""Side inputs: per-model statistics read beside the models, chunk by chunk (Fisher, RegMean).

A data-aware method declares a :class:`~tiesmerge.methods.base.SideInput`; the executor asks
this module for each chunk's statistics: the same rows of every model's Fisher diagonal, or
every model's whole (in, in) Gram matrix of a Linear weight. Statistics are ordinary
checkpoints (safetensors keyed like the model), checked up front against the alignment, so
a statistics file that does not fit its model is a typed error before anything is merged.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

from ..errors import IncompatibleCheckpointsError, InvalidTensorError, MergeWarning
from ..io.align import Alignment, TensorJob
from ..io.checkpoint import Checkpoint
from ..lazy import torch
from ..methods.base import SideInput
from ..unicode_names import apart, normalization_twin
from .plan import Chunk, Plan
from .reduce import rms_scales

__all__ = ["SideInputs"]


class SideInputs:
    """One statistics checkpoint per model, validated against the merge's tensors."""

    def __init__(self, spec: SideInput, stats: list[Checkpoint], models: list[Checkpoint], alignment: Alignment, *,
                 device: torch.device, progress: Callable[[int], None] | None = None) -> None:
        if len(stats) != len(models):
            raise IncompatibleCheckpointsError(
                f"{len(stats)} statistics given for {len(models)} models",
                hint="give one statistics directory per model, in the models' order (--stats once per --model)")
        self.spec, self.stats, self.device = spec, stats, device
        self._progress = progress or (lambda nbytes: None)
        self._jobs = {job.name: job for job in alignment.jobs if job.merge}
        # which stored name holds each merged tensor's statistic (tied tensors may use an alias)
        self.names: list[dict[str, str]] = [self._validate(k, s, models[k]) for k, s in enumerate(stats)]
        self.missing = sorted({name for k in range(len(stats)) for name, job in self._jobs.items()
                               if name not in self.names[k] and self.expected_shape(job) is not None})
        # a statistic some models' statistics hold and others' lack: statistics tiesmerge computed for one
        # architecture cover the same tensors, so the gap is a damaged or foreign file, not a tensor no kind covers
        uneven = [name for name in self.missing if any(name in self.names[k] for k in range(len(stats)))]
        if uneven:
            lacking = [k for k in range(len(stats)) if uneven[0] not in self.names[k]]
            warnings.warn(MergeWarning(
                f"{len(uneven)} tensor(s) have {spec.kind} statistics in some models but not in others (e.g. "
                f"{uneven[0]!r}, missing for model(s) {', '.join(map(str, lacking))}): they are averaged instead; "
                "statistics computed for the same architecture cover the same tensors, so a file may be damaged or "
                "from another run (recompute them)"), stacklevel=2)
        self.scales = rms_scales(spec.kind, stats, self.names) if spec.normalize == "rms" else [1.0] * len(stats)
        self._cached: tuple[str, torch.Tensor | None] | None = None  # whole Gram matrices of the last job
        self.bytes_read = 0  # by the merge pass
        self._nonzero = [False] * len(stats)  # a value other than 0 seen in model k's statistics

    # ------------------------------------------------------------------ checks
    def expected_shape(self, job: TensorJob) -> tuple[int, ...] | None:
        """The statistic's shape for ``job``, or None where this kind has none (a 1-D tensor's Gram)."""
        if self.spec.rows:
            return job.shape
        return (job.shape[1], job.shape[1]) if len(job.shape) == 2 else None

    def _validate(self, k: int, stats: Checkpoint, model: Checkpoint) -> dict[str, str]:
        owner = {alias: job for job in self._jobs.values() for alias in (job.name, *job.aliases)}
        found: dict[str, str] = {}
        for name in stats.names():
            info = stats.info(name)
            job = owner.get(name)
            if job is None:
                why = "is not a tensor of the model" if name not in model.names() else "is not merged (not floating)"
                hint = "statistics must be computed with the model they are given for, in the models' order"
                prefixed = [n for n in owner if n.endswith("." + name)]  # computed on a submodule (hp65b c18)
                twin = normalization_twin(name, owner)  # (hp74a c62: names printed alike, "another model")
                if twin is not None:
                    hint = f"{apart(name, twin)}: save the statistics' names in the model's form"
                elif prefixed:
                    prefix = prefixed[0][:-len(name)]
                    hint = (f"the model names it {prefixed[0]!r}: the statistics were computed on a submodule "
                            f"(their names lack the prefix {prefix!r}); compute them on the whole model, or rename "
                            "their tensors")
                raise IncompatibleCheckpointsError(
                    f"{stats.location(name)}: statistic {name!r} {tuple(info.shape)} {why} "
                    f"(model {k}: {model.label})", hint=hint)
            want = self.expected_shape(job)
            if want is not None and info.shape == want and not info.dtype.is_floating_point:  # the shape is right
                raise IncompatibleCheckpointsError(
                    f"{stats.location(name)}: statistic {name!r} is {str(info.dtype).removeprefix('torch.')}, but a "
                    f"{self.spec.kind} statistic is floating-point (its shape {tuple(info.shape)} is right)",
                    hint="the statistics file was converted or written by another tool: recompute it with "
                         "tiesmerge stats")
            if want is None or info.shape != want or not info.dtype.is_floating_point:
                what = (f"a {self.spec.kind} statistic of shape {want}" if want is not None
                        else f"no {self.spec.kind} statistic (only 2-D weights have Gram matrices)")
                raise IncompatibleCheckpointsError(
                    f"{stats.location(name)}: statistic {name!r} is {tuple(info.shape)} "
                    f"{str(info.dtype).removeprefix('torch.')}, but tensor {name!r} of model {k} ({model.label}) "
                    f"is {job.shape}, which takes {what}",
                    hint="the statistics belong to another model or architecture; recompute them with this model")
            found[job.name] = name
        if not found:
            raise IncompatibleCheckpointsError(
                f"{stats.label}: holds no statistic for any tensor of model {k} ({model.label})",
                hint="the statistics belong to another model; recompute them with this model")
        return found

    # ------------------------------------------------------------------ reading
    def read(self, chunk: Chunk) -> torch.Tensor | None:
        """(n, *rows of the chunk) Fisher values, or (n, in, in) Gram matrices, float32 on the
        device; None when some model has no statistic for this tensor (the method averages)."""
        name = chunk.job.name
        if name in self.missing or self.expected_shape(chunk.job) is None:
            return None
        if not self.spec.rows and self._cached is not None and self._cached[0] == name:
            return self._cached[1]
        rows = chunk.rows if self.spec.rows else None
        values = []
        for k, stats in enumerate(self.stats):
            raw = stats.read(self.names[k][name], rows)
            self.bytes_read += raw.numel() * raw.element_size()
            self._progress(raw.numel() * raw.element_size())
            value = raw.to(self.device, torch.float32)
            if not self._nonzero[k]:
                self._nonzero[k] = bool(value.any())
            stored = {torch.float16: "F16", torch.bfloat16: "BF16"}.get(raw.dtype, "")  # as stored
            if raw.dtype == torch.float64 and bool(torch.isfinite(raw).all()):
                stored = "F64"  # finite as given: what is not finite came of the cast to float32 (hp63b c40)
            why = self._invalid(value, stored)
            if why:
                raise InvalidTensorError(f"{stats.location(self.names[k][name])}: {self.spec.kind} statistic "
                                         f"{name!r} {why}",
                                         # (an older tiesmerge's overflow is NaN or Inf, never a negative value,
                                         # nor an asymmetric or indefinite matrix: hp84b c42, hp88a c75)
                                         hint="the statistics file is damaged" + (
                                             ", or an older tiesmerge wrote statistics that overflow (it now refuses "
                                             "them, naming the tensor)" if "NaN or Inf" in why else "")
                                         + ": recompute them")
            scale = self.scales[k]
            if 1e-30 <= scale <= 1e30:
                values.append(value.mul_(scale))
            else:  # statistics near float32's ends (subnormal Fisher values: 1 / rms ~1e45 is Inf in float32): scaled
                # in float64, where the factor is a number, to the rms-1 values float32 holds
                values.append(value.double().mul_(scale).float())
        side = torch.stack(values)  # (n, ...)
        if not self.spec.rows:
            self._cached = (name, side)
        return side

    def warn_if_silent(self, method: str) -> None:
        """After the merge: a model whose statistics were zero everywhere they were read (a failed statistics run, a
        model whose loss had no gradient, an edited file) had no say in the merge; said once, naming it (hostile pass
        25, N4). Every model's zero: the methods' plain mean, as documented, said too (statistics computed on
        nothing: hp88a c80)."""
        silent = [k for k, seen in enumerate(self._nonzero) if not seen]
        if silent and len(silent) == len(self._nonzero) and self.bytes_read:  # every model's: statistics computed on
            # nothing, and the merge is a plain mean, which nobody asked for by name (hp88a c80: said nowhere)
            warnings.warn(MergeWarning(
                f"{method}: every model's {self.spec.kind} statistics are all zeros wherever the merge read them, so "
                "no model weighs more than another: the merge is the plain mean of the models; recompute the "
                "statistics (tiesmerge stats) on data that reaches the models, or merge with average"), stacklevel=3)
        elif silent and self.bytes_read:
            warnings.warn(MergeWarning(
                f"{method}: the {self.spec.kind} statistics of model(s) {', '.join(map(str, silent))} are all zeros "
                "wherever the merge read them, so those models had (almost) no say in it; recompute their "
                "statistics (tiesmerge stats) on data that reaches the model"), stacklevel=3)

    def _invalid(self, value: torch.Tensor, stored_dtype: str = "") -> str | None:
        """What makes one model's statistic unusable, or None: NaN or Inf; a negative Fisher value
        (a mean of squares); a Gram matrix X^T X / N that is not positive semi-definite."""
        if not bool(torch.isfinite(value).all()):
            if stored_dtype == "F64":  # finite as given, past float32 in the read's cast
                return "holds values past float32's range (3.4e38; the merge computes in float32)"  # (hp63b c40)
            return "holds NaN or Inf values"
        if self.spec.kind == "fisher":
            return "holds negative values (a Fisher diagonal is a mean of squares)" if bool((value < 0).any()) else None
        if self.spec.kind == "gram" and value.dim() == 2 and value.shape[0] == value.shape[1] and value.numel():
            # (in, in): symmetric, with a Cholesky factor once a tolerance for float32 rounding is added to
            # its diagonal (a Gram matrix of real inputs has one; -I or a flipped sign has not). A few
            # (in, in) temporaries, one matrix at a time, like the merge's own solve.
            scale = max(float(value.diagonal().abs().max()), 1e-30)
            if float((value - value.T).abs_().max()) > 1e-4 * scale:
                return "is not symmetric, so it is no Gram matrix X^T X / N"
            g = value.to(torch.float64)
            g.diagonal().add_(1e-6 * scale)
            if bool((value.diagonal() < 0).any()) or int(torch.linalg.cholesky_ex(g).info):
                return ("is not positive semi-definite, so it is no Gram matrix X^T X / N"
                        + (f" (stored as {stored_dtype}, whose rounding can make a Gram matrix slightly indefinite: "
                           "compute or store statistics in float32)" if stored_dtype in ("F16", "BF16") else ""))
        return None

    # ------------------------------------------------------------------ planning
    def bytes_per_pass(self) -> int:
        return sum(self.stats[k].info(stored).nbytes
                   for k in range(len(self.stats)) for stored in self.names[k].values())

    def extra_bytes_per_entry(self) -> int:
        """Working bytes per entry of a chunk that row-shaped statistics add: the float32 stack and
        the method's floored copy and product (3 float32 values per model)."""
        return 3 * 4 * len(self.stats) if self.spec.rows else 0

    def reserved_bytes(self) -> int:
        """Memory the statistics hold beside a chunk whatever its size (Gram matrices: per model the float32 stack,
        float64 copy and shrunk copy, plus the sums, of the widest input); the planner sizes chunks in what is left,
        so that the floor a too-small budget is told is one that fits (hp37 C110: it moved with the budget)."""
        if self.spec.rows:
            return 0
        widest = max((job.shape[1] for job in self._jobs.values() if len(job.shape) == 2), default=0)
        return (20 * len(self.stats) + 24) * widest * widest

    def adjust_plan(self, plan: Plan) -> Plan:
        """The plan with the statistics' reads in the merge pass, and (Gram matrices) their memory,
        accounted for. (normalize="rms" read them once more already, to find each model's scale.)"""
        reads = self.bytes_per_pass()
        peak = plan.peak_bytes + self.reserved_bytes()
        notes = plan.notes
        if self.missing:
            notes = (*notes, f"{len(self.missing)} tensor(s) averaged for want of {self.spec.kind} statistics in "
                             f"some model, e.g. {self.missing[0]!r}")
        return dataclasses.replace(plan, side_bytes=plan.side_bytes + reads, peak_bytes=peak, notes=notes)
