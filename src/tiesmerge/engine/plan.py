"""A merge plan as plain data: which tensors, in which row chunks, how many bytes, how much memory.

The chunk planner keeps every chunk's working set under the memory budget. For a chunk of E
entries the working set is, at once:

* fused CPU kernels: the raw rows of the base and the n models twice (the chunk being merged
  and the one read ahead, both in reused buffers) and the output rows twice (the chunk being
  merged and the one being written out by the writer thread);
* torch path: the same raw rows, plus the float32 task vectors (n, E), a few float32
  temporaries of that size in the method, the float32 base and merged values, and the cast.

Chunks are also capped at ``SPEED_CHUNK_ENTRIES`` where the scope allows it: larger chunks are
no faster (reads overlap compute either way) and only cost memory. A per-tensor trimming scope
keeps a tensor whole when the budget allows, so its threshold is found in memory; a method that
needs whole tensors (exact k, SVD, SLERP) gets them, or an error that names the budget it needs;
its declared ``workspace`` (an SVD's factors and LAPACK's work arrays) is counted in.

The passes come from the method's :class:`~tiesmerge.methods.base.Requirements`: with the
global scope, one counting pass per cut (two for a small model, which takes no sampled
bracket), one pass for the reductions, then the merge; with the per-tensor scope, a tensor
too large for one chunk is read again for its own cuts and reductions before it is merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..dtypes import DType, as_dtype
from ..errors import ConfigError
from ..io.align import Alignment, TensorJob
from ..methods.base import Requirements
from ..sizes import format_size

if TYPE_CHECKING:
    import torch

__all__ = ["Chunk", "Plan", "bytes_per_entry", "rows_per_chunk", "make_plan", "SAMPLED_NUMEL"]

FIXED_OVERHEAD = 64 << 20  # histograms, the top-k sample, small buffers: accounted once, not per chunk
SPEED_CHUNK_ENTRIES = 1 << 23  # chunks beyond this many entries are no faster
SAMPLED_NUMEL = 1 << 22  # scopes above this many entries get a sampled bracket: one counting pass, not two
_TEMPORARIES = 10  # float32 (n, E) temporaries of the torch path besides tau: masks, signs, products and
# what the allocator keeps (measured: 3 undercounted a 256 MiB budget run 2.3x, benchmarks/speed/NOTES.md)


@dataclass(frozen=True)
class Chunk:
    job: TensorJob
    rows: slice | None  # None for 0-d tensors
    offset: int  # flat index of the chunk's first entry in its tensor
    numel: int


def bytes_per_entry(n_models: int, in_itemsize: int, out_itemsize: int, *, fused: bool = False,
                    extra_inputs: int = 0, temporaries: int | None = None) -> int:
    """Peak working bytes per tensor entry of one chunk (see the module docstring).
    ``extra_inputs``: rows read beside the base and the models (a reference model, and the
    real base when the engine's base stands in for it), each also widened to float32.
    ``temporaries``: float32 (n, E) temporaries of the method on the torch path (None: the
    elementwise methods' default; the SVD methods declare 0 and plan their memory as workspace).

    >>> bytes_per_entry(3, 2, 2, fused=True)  # bf16 in and out: 2 x 4 inputs x 2 B + 2 x 2 B
    20
    """
    raw = 2 * (n_models + 1 + extra_inputs) * in_itemsize  # current + read-ahead
    if fused:  # two output buffers: one being written out while the next chunk is merged
        return raw + 2 * (out_itemsize if out_itemsize in (2, 4) else 4 + out_itemsize)  # float32, then the cast
    temps = _TEMPORARIES if temporaries is None else temporaries
    work = (1 + temps) * n_models * 4 + 4 * extra_inputs  # tau and temporaries, float32
    return raw + work + 4 + 4 + out_itemsize  # base32, merged32, output


def rows_per_chunk(shape: tuple[int, ...], per_entry: int, budget: int) -> int:
    """Rows of a tensor that fit in ``budget`` bytes (at least one)."""
    if not shape:
        return 1
    row_entries = 1
    for s in shape[1:]:
        row_entries *= s
    return max(1, min(shape[0], budget // max(1, row_entries * per_entry)))


@dataclass(frozen=True)
class Plan:
    chunks_by_job: dict[str, tuple[Chunk, ...]]
    jobs: tuple[TensorJob, ...]
    bytes_per_pass: int  # bytes read by one pass over every merged tensor (all inputs)
    copy_bytes: int  # bytes of tensors copied from the base
    passes: int  # passes over the merged tensors (selection + reductions + merge)
    peak_bytes: int  # estimated peak working memory
    memory_budget: int
    output_bytes: int
    notes: tuple[str, ...] = field(default=())
    reduce_bytes: int = 0  # extra reads of per-tensor scopes too large for one chunk (reduced first)
    side_bytes: int = 0  # statistics read beside the models by data-aware methods (Fisher, RegMean)
    pass_names: tuple[str, ...] = ("merge",)  # what each whole-stream pass does, in order
    adapter_output: bool = False  # a merged adapter is written: nothing copied, its size known once factored
    adapter_layout: str = ""  # what that adapter holds (rank-8 LoRA factors of 6 modules...), sized in output_bytes
    copied_bytes: tuple[int, ...] = ()  # sizes of the files a merge copies beside the weights (config, tokenizer)

    @property
    def bytes_to_read(self) -> int:
        return self.bytes_per_pass * self.passes + self.reduce_bytes + self.copy_bytes + self.side_bytes


def stream_passes(requirements: Requirements, merged_numel: int) -> tuple[str, ...]:
    """The whole-stream passes of a merge, named: counting passes for the cuts (global scope),
    the reductions, then the merge."""
    names: list[str] = []
    if requirements.scope == "global":
        per_cut = 1 if merged_numel > SAMPLED_NUMEL else 2  # a sampled bracket, or a two-pass radix select
        for cut in requirements.all_cuts:
            names += [f"count ({cut.name})"] * per_cut
        if requirements.reductions:
            names.append("reduce (" + ", ".join(r.name for r in requirements.reductions) + ")")
    return (*names, "merge")


def make_plan(alignment: Alignment, n_models: int, requirements: Requirements | None = None, *,
              memory_budget: int, out_dtype: DType | torch.dtype | None, fused: bool = False, extra_inputs: int = 0,
              extra_bytes_per_entry: int = 0, reserved_bytes: int = 0) -> Plan:
    """Cut every merged tensor into row chunks under the budget, and count the passes.

    ``fused``: the fused CPU kernels merge (their working set). ``extra_inputs``: rows read
    beside the base and the models (a reference model; the real base beside a stand-in).
    ``extra_bytes_per_entry``: working bytes per entry beyond the usual (row-shaped statistics
    of data-aware methods). ``reserved_bytes``: memory held beside every chunk (RegMean's Gram
    matrices), set aside before the chunks are sized; the caller adds it to the peak.
    """
    req = requirements or Requirements()
    # tiny budgets (tests) keep half for the chunk; real ones set the fixed overhead aside
    work_budget = memory_budget - FIXED_OVERHEAD if memory_budget > 2 * FIXED_OVERHEAD else memory_budget // 2
    work_budget -= reserved_bytes
    per_tensor_cuts = req.scope == "per_tensor" and bool(req.all_cuts or req.reductions)
    prefer_whole = req.keeps_tensors_whole or per_tensor_cuts  # found in memory when the budget allows
    # a tensor too large for one chunk and a per-tensor scope: its own counting and reduction passes first
    chunked_scope_passes = 2 * len(req.all_cuts) + int(bool(req.reductions)) if per_tensor_cuts else 0
    chunks: dict[str, tuple[Chunk, ...]] = {}
    bytes_per_pass = copy_bytes = output_bytes = peak = extra = 0
    out = as_dtype(out_dtype) if out_dtype is not None else None

    def entry_bytes(job: TensorJob) -> int:
        """Working bytes per entry of a merged tensor (its inputs, output and temporaries)."""
        return bytes_per_entry(n_models, job.itemsize, job.output_dtype(out).itemsize, fused=fused,
                               extra_inputs=extra_inputs, temporaries=req.temporaries) \
            + extra_bytes_per_entry + (4 * n_models if req.model_values else 0)  # the models' own values

    def workspace_bytes(job: TensorJob) -> int:
        return req.workspace(tuple(job.shape), n_models) if req.workspace is not None else 0
    for job in alignment.jobs:
        itemsize = job.itemsize
        out_size = job.output_dtype(out).itemsize
        # the data, and the tensor's entry in the file's JSON header (name, dtype, shape, offsets: ~64 bytes beside
        # the name), 85% of the file for 100,000 tiny tensors (hp38 C14)
        output_bytes += (job.numel * out_size + len(job.name.encode()) + 64) * (1 + len(job.aliases))
        if not job.merge:
            copy_bytes += job.numel * itemsize
            # a copy cast to the output dtype holds the stored bytes, a float32 view and the cast
            held = job.numel * (itemsize + 4 + out_size) if job.cast_on_copy(out) else job.numel * itemsize
            peak = max(peak, held)
            continue
        per_entry, workspace = entry_bytes(job), workspace_bytes(job)
        if req.keeps_tensors_whole and job.numel * per_entry + workspace > work_budget:
            # the largest whole tensor (this one or a later one), and the smallest budget whose working part holds it
            # (see work_budget: half of a small budget, else all but the fixed overhead)
            core = max(j.numel * entry_bytes(j) + workspace_bytes(j) for j in alignment.jobs if j.merge)
            needed = 2 * core if core <= FIXED_OVERHEAD else core + FIXED_OVERHEAD
            why = "threshold_ties='sort' (mergekit's exact k)" if req.exact_k else "the method"
            # (the workspace is the method's own: an SVD's factors, DELLA's ranks; "e.g. for its SVDs" was said of
            # DELLA too, hp85a c51)
            held = f" (with {format_size(workspace)} of workspace the method needs beside it)" if workspace else ""
            raise ConfigError(f"tensor {job.name!r} {tuple(job.shape)} does not fit one chunk under the memory budget "
                              f"of {format_size(memory_budget)}, and {why} needs each tensor whole{held}",
                              hint=f"raise --memory-budget to {format_size(needed, up=True)} or more "
                                   "(memory_budget: in a recipe, memory_budget= from Python)")
        # the chunk's rows fit beside the tensor's workspace (RegMean's Gram matrices): sized as if it were not there,
        # the peak passed the budget by it, and the floor the command line names moved with the budget (hp37 C110)
        budget = (work_budget if prefer_whole else min(work_budget, SPEED_CHUNK_ENTRIES * per_entry)) - workspace
        rows = job.shape[0] if req.keeps_tensors_whole and job.shape else rows_per_chunk(job.shape, per_entry, budget)
        row_entries = job.numel // job.shape[0] if job.shape and job.shape[0] else 0
        if not job.shape:
            pieces = [Chunk(job, None, 0, 1)]
        elif job.numel == 0:
            pieces = [Chunk(job, slice(0, job.shape[0]), 0, 0)]
        else:
            pieces = [Chunk(job, slice(r, min(r + rows, job.shape[0])), r * row_entries,
                            (min(r + rows, job.shape[0]) - r) * row_entries)
                      for r in range(0, job.shape[0], rows)]
        chunks[job.name] = tuple(pieces)
        read = job.numel * itemsize * (n_models + 1 + extra_inputs)
        bytes_per_pass += read
        if len(pieces) > 1:
            extra += read * chunked_scope_passes
        peak = max(peak, max(c.numel for c in pieces) * per_entry + workspace)
    notes = []
    chunked = [name for name, c in chunks.items() if len(c) > 1]
    if chunked:
        notes.append(f"{len(chunked)} tensor(s) merged in row chunks, e.g. {chunked[0]!r} in {len(chunks[chunked[0]])}")
    names = stream_passes(req, alignment.merged_numel())
    return Plan(chunks, alignment.jobs, bytes_per_pass, copy_bytes, len(names), peak + FIXED_OVERHEAD,
                memory_budget, output_bytes, tuple(notes), extra, pass_names=names)
