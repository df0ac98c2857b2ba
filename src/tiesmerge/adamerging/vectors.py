"""Each task's processed vector v_t, through the merge engine: what AdaMerging combines.

A method that defines ``task_vectors(tau, ctx)`` (see :mod:`tiesmerge.methods.base`) says what
its per-task vectors are: task arithmetic's w_t tau_t, TIES's trimmed values that agree with the
elected sign (AdaMerging++), DARE's, Breadcrumbs' and DELLA's sparsified ones, TSV-M's per-task
components in its decorrelated bases. The engine runs
that method as in a merge (the same trims over the same scopes, reductions, reference, weights),
and :class:`_Collect` keeps each chunk's vectors instead of summing them; the output of that
run is the base's values (a zero delta), in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..engine.executor import MemorySink
from ..errors import ConfigError
from ..inputs import Source, prepare
from ..lazy import torch
from ..methods.base import ChunkContext, MergeMethod, Requirements

__all__ = ["TaskVectors", "collect_task_vectors", "exposes_task_vectors"]


def exposes_task_vectors(method: MergeMethod) -> bool:
    return callable(getattr(method, "task_vectors", None))


@dataclass
class TaskVectors:
    """The base's values and every merged tensor's per-task vectors, keyed like the checkpoint.

    base:     every tensor of the base (merged ones in float32), tied names sharing one tensor.
    vectors:  merged tensor name -> (n, *S) float32, v_t for each model t.
    names:    the merged tensors, in the checkpoint's order (the layers of layer-wise AdaMerging).
    """

    base: dict[str, torch.Tensor]
    vectors: dict[str, torch.Tensor]
    names: list[str]

    @property
    def n_models(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.vectors.values())


@dataclass(frozen=True)
class _Collect:
    """A method run for its per-task vectors: the engine provides what ``inner`` requires (its
    kernel dropped: the torch path hands each chunk to ``merge``), ``merge`` stores
    ``inner.task_vectors`` in ``store`` and returns a zero delta."""

    inner: Any
    store: dict = field(default_factory=dict, compare=False)
    name: ClassVar[str] = "task_vectors"
    collects_only: ClassVar[bool] = True  # its zero deltas are by design: the engine does not warn of an unchanged base
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = "each model's processed task vector"

    def requirements(self) -> Requirements:
        return dataclasses.replace(self.inner.requirements(), kernel=None)

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        n = tau.shape[0]
        zero = torch.zeros(tau.shape[1:], dtype=torch.float32, device=tau.device)  # (*S): the base comes out
        vectors = self.inner.task_vectors(tau, ctx).float()  # (n, *S chunk)
        if ctx.name not in self.store:
            self.store[ctx.name] = torch.zeros((n, *ctx.shape), dtype=torch.float32, device=tau.device)
        flat = self.store[ctx.name].view(n, -1)  # (n, E) of the whole tensor
        flat[:, ctx.offset:ctx.offset + vectors[0].numel()] = vectors.reshape(n, -1)
        return zero


def collect_task_vectors(base: Source, models: Sequence[Source], method: MergeMethod, *, device: str = "cpu",
                         memory_budget: int | str | None = None, vocab_policy: str = "error",
                         allow_pickle: bool = False) -> TaskVectors:
    """Run ``method`` through the engine for its per-task vectors (see the module docstring)."""
    if not exposes_task_vectors(method):
        raise ConfigError(f"method {method.name!r} does not expose per-task vectors, so its combination cannot be "
                          "learned", hint="use task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, "
                          "breadcrumbs_ties, della, della_linear or tsv_m (or define task_vectors(tau, ctx) on the "
                          "method)")
    if method.requirements().model_values:
        raise ConfigError(f"method {method.name!r} interpolates the models themselves, not task vectors")
    collect = _Collect(method)
    with ExitStack() as stack:
        prepared = prepare(stack, base, models, collect, device=device, memory_budget=memory_budget,
                           dtype="float32", vocab_policy=vocab_policy, allow_pickle=allow_pickle)
        executor = prepared.executor
        sink = MemorySink(executor.alignment.jobs, executor.out_dtype)
        executor.run(sink)
    names = [j.name for j in executor.alignment.jobs if j.merge]
    for name in names:  # a tensor of only zero-sized chunks never reached merge
        if name not in collect.store:
            collect.store[name] = torch.zeros((len(models), *sink.state[name].shape), dtype=torch.float32)
    return TaskVectors(base=sink.state, vectors={n: collect.store[n] for n in names}, names=names)
