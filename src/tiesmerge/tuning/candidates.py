"""One candidate's work, the same wherever it runs: merge its task vector, scale it, score it.

lam only scales the merged task vector (theta = base + lam * tau_m), so candidates whose other
options agree share one merge: their *merge key* is their options without lam. A merge runs at
lam = 1 with float32 output (tau_m without a rounding that lam would amplify); each candidate is
then ``base + lam * tau_m`` in the base's dtypes. Both executors call exactly these functions, so
a search scores the same numbers in one process and on a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..errors import ConfigError
from ..methods.base import MergeMethod
from ..registry import make_method, method_class
from .space import canonical

__all__ = ["Candidate", "Job", "merge_key", "merged_delta", "candidate_state", "check_candidate", "scaled_state",
           "score_state", "as_state", "float32"]

Evaluator = Callable[[Mapping[str, torch.Tensor]], float]


@dataclass(frozen=True)
class Candidate:
    """A point of the search: its full options (fixed ones included) and its place in the search."""

    index: int
    options: dict[str, Any]

    @cached_property
    def key(self) -> str:
        """Identifies the candidate in the results log (a resumed search matches on it). Cached: a search
        compares the keys of every candidate of a batch, and a grid asks its whole grid as one batch."""
        return json.dumps(canonical(self.options), sort_keys=True)

    @property
    def merge_key(self) -> str:
        return merge_key(self.options)


def merge_key(options: Mapping[str, Any]) -> str:
    """Candidates with the same merge key share one merge (they differ in lam only)."""
    return json.dumps(canonical({k: v for k, v in options.items() if k != "lam"}), sort_keys=True)


@dataclass(frozen=True)
class Job:
    """What every candidate of a search merges: the method (a name or a config object whose
    fields the candidates override), base and models (paths or state dicts), and where."""

    method: str | MergeMethod
    base: Any
    models: tuple[Any, ...]
    device: str = "cpu"
    memory_budget: int | str | None = None
    vocab_policy: str = "error"  # "error" or "truncate" (a union changes the base's shapes, which tuning scales)
    allow_distant: bool = False  # models that do not look fine-tuned from the base, merged all the same

    @property
    def has_lam(self) -> bool:
        cls = method_class(self.method) if isinstance(self.method, str) else type(self.method)
        return "lam" in {f.name for f in dataclasses.fields(cls)}

    def method_at(self, options: Mapping[str, Any]) -> MergeMethod:
        """The method config with ``options`` set (a ConfigError names a bad value)."""
        if isinstance(self.method, str):
            return make_method(self.method, dict(options))
        return dataclasses.replace(self.method, **options)

    def lam_of(self, options: Mapping[str, Any]) -> float:
        """The scale applied on top of the shared merge (1 for a method without lam)."""
        if not self.has_lam:
            return 1.0
        if "lam" in options:
            return float(options["lam"])
        return float(self.method.lam if not isinstance(self.method, str) else self.method_at({}).lam)


def merged_delta(job: Job, base32: Mapping[str, torch.Tensor], options: Mapping[str, Any],
                 base: Any = None, models: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
    """tau_m (float32) of the candidates with ``options``' merge key: the engine's merge at lam = 1
    minus the base (for a method without lam, the merged floating tensors themselves).
    ``base``/``models`` replace the job's sources (e.g. a worker's local copies)."""
    from ..api import merge

    merge_options = {k: v for k, v in options.items() if k != "lam"}
    if job.has_lam:
        merge_options["lam"] = 1.0
    merged = merge(job.base if base is None else base, list(job.models if models is None else models),
                   job.method_at(merge_options), device=job.device, memory_budget=job.memory_budget,
                   dtype=torch.float32, vocab_policy=job.vocab_policy, allow_distant=job.allow_distant)
    if not job.has_lam:  # nothing scales it: the merge itself (base + (merged - base) could round)
        return {k: v for k, v in merged.items() if v.is_floating_point()}
    return {k: merged[k].float() - base32[k] for k in merged if merged[k].is_floating_point()}


def candidate_state(job: Job, base32: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                    options: Mapping[str, Any], dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The candidate's state dict from its merge key's :func:`merged_delta`."""
    if not job.has_lam:  # fresh tensors: an evaluator may change its state in place (delta is shared by a key)
        return {k: delta[k].to(dtypes[k], copy=True) if k in delta else base32[k].clone() for k in base32}
    lam = job.lam_of(options)
    state = scaled_state(base32, delta, lam, dtypes)
    shown = {**options, "lam": lam}
    check_candidate(state, delta, " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in shown.items()))
    return state


def check_candidate(state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], where: str) -> None:
    """A lam-scaled candidate is checked before it is scored, as a written output is (finite.py): Inf
    weights would reach the evaluator, and could even score best. An error, not a skip: lam is the
    user's own choice, and a sweep that silently dropped points would report a best over fewer."""
    from ..errors import InvalidTensorError
    from ..finite import first_nonfinite

    for name in delta:  # only scaled tensors can overflow; the base's own were checked when read
        if first_nonfinite(state[name], "F32") is not None:
            raise InvalidTensorError(
                f"candidate {where}: tensor {name!r} is not finite (Inf or NaN) once the merge is scaled by lam, "
                "so this candidate cannot be scored", hint="use smaller lam values (a sensible lam is a few units)")


def scaled_state(base32: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], lam: float,
                 dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """base + lam * tau_m, each tensor in the base's dtype (integer buffers are copies of the base's: an
    evaluator may change its state in place, and the caller's base and later candidates must not see it)."""
    return {k: (base32[k] + lam * delta[k]).to(dtypes[k]) if k in delta else base32[k].clone() for k in base32}


def score_state(evaluate: Evaluator, state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """(score, seconds): ``evaluate``'s score as a float (NaN stays NaN: it never wins)."""
    started = time.perf_counter()
    score = float(evaluate(state))
    return score, time.perf_counter() - started


def better(score: float, best: float | None) -> bool:
    """Whether ``score`` beats ``best`` (the first of equal scores wins; NaN never wins)."""
    return math.isfinite(score) and (best is None or score > best)


def as_state(source: Any) -> dict[str, torch.Tensor]:
    """A path or a state dict, as a state dict (the base is held in memory to scale candidates)."""
    from ..io.checkpoint import open_checkpoint

    if isinstance(source, Mapping):  # its entries checked as merge checks them: {"x": 1} was an AttributeError of
        open_checkpoint(source, label="the base").close()  # .dtype in tune and run_search (hp80b c05)
        # detached: a base whose tensors require grad gave the evaluator candidates carrying autograd graphs
        return {name: value.detach() for name, value in source.items()}  # (hp82b c16)
    from ..inputs import refuse_adapter_base

    ckpt = open_checkpoint(source, role="the base")
    try:
        refuse_adapter_base(ckpt)
        return {name: ckpt.read(name) for name in ckpt.names()}
    finally:
        ckpt.close()


def float32(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.dtype]]:
    """(the state with floating tensors in float32, each tensor's dtype)."""
    return ({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
            {k: v.dtype for k, v in state.items()})


def check_tuning_vocab_policy(vocab_policy: str) -> None:
    """Tuning scales base + lam * tau_m on the base's own tensors: a policy that keeps the base's shapes only."""
    if vocab_policy not in ("error", "truncate"):
        raise ConfigError(f"vocab_policy={vocab_policy!r}: tune and search take 'error' or 'truncate' (the base's "
                          "rows); a union grows the base's tensors, which the candidates are scaled on",
                          hint="tune with --vocab-policy truncate, then merge the chosen options with --vocab-policy "
                               "union")

