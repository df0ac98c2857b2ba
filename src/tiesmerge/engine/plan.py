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
keeps a tensor whole when the budget allows, so its threshold is found in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..io.align import Alignment, TensorJob

__all__ = ["Chunk", "Plan", "bytes_per_entry", "rows_per_chunk", "make_plan"]

FIXED_OVERHEAD = 64 << 20  # histograms, the top-k sample, small buffers: accounted once, not per chunk
SPEED_CHUNK_ENTRIES = 1 << 23  # chunks beyond this many entries are no faster
_TEMPORARIES = 10  # float32 (n, E) temporaries of the torch path besides tau: masks, signs, products and
# what the allocator keeps (measured: 3 undercounted a 256 MiB budget run 2.3x, benchmarks/speed/NOTES.md)


@dataclass(frozen=True)
class Chunk:
    job: TensorJob
    rows: slice | None  # None for 0-d tensors
    offset: int  # flat index of the chunk's first entry in its tensor
    numel: int


def bytes_per_entry(n_models: int, in_itemsize: int, out_itemsize: int, *, fused: bool = False) -> int:
    """Peak working bytes per tensor entry of one chunk (see the module docstring).

    >>> bytes_per_entry(3, 2, 2, fused=True)  # bf16 in and out: 2 x 4 inputs x 2 B + 2 x 2 B
    20
    """
    raw = 2 * (n_models + 1) * in_itemsize  # current + read-ahead
    if fused:  # two output buffers: one being written out while the next chunk is merged
        return raw + 2 * (out_itemsize if out_itemsize in (2, 4) else 4 + out_itemsize)  # float32, then the cast
    work = (1 + _TEMPORARIES) * n_models * 4  # tau and temporaries, float32
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
    passes: int  # passes over the merged tensors (selection + merge)
    peak_bytes: int  # estimated peak working memory
    memory_budget: int
    output_bytes: int
    notes: tuple[str, ...] = field(default=())

    reduce_bytes: int = 0  # extra reads of per-tensor scopes too large for one chunk (reduced first)
    side_bytes: int = 0  # statistics read beside the models by data-aware methods (Fisher, RegMean)

    @property
    def bytes_to_read(self) -> int:
        return self.bytes_per_pass * self.passes + self.reduce_bytes + self.copy_bytes + self.side_bytes


def make_plan(alignment: Alignment, n_models: int, *, memory_budget: int, out_dtype: torch.dtype | None,
              selection_passes: int, chunked_scope_passes: int = 0, fused: bool = False,
              whole_tensors: bool = False, extra_bytes_per_entry: int = 0) -> Plan:
    """Cut every merged tensor into row chunks under the budget.

    ``selection_passes``: whole-stream passes before the merge (2 for a global radix select,
    +1 for a global majority sign). ``chunked_scope_passes``: extra passes over a per-tensor
    scope's own chunks when a tensor is too large for one chunk. ``fused``: the fused CPU
    kernels' working set. ``whole_tensors``: keep tensors whole when the budget allows (a
    per-tensor trimming scope); otherwise chunks stop at ``SPEED_CHUNK_ENTRIES``.
    ``extra_bytes_per_entry``: working bytes per entry beyond the usual (row-shaped statistics
    of data-aware methods).
    """
    # tiny budgets (tests) keep half for the chunk; real ones set the fixed overhead aside
    work_budget = memory_budget - FIXED_OVERHEAD if memory_budget > 2 * FIXED_OVERHEAD else memory_budget // 2
    chunks: dict[str, tuple[Chunk, ...]] = {}
    bytes_per_pass = copy_bytes = output_bytes = peak = extra = 0
    for job in alignment.jobs:
        itemsize = job.dtype.itemsize
        out_size = (out_dtype or job.dtype).itemsize if job.merge else itemsize
        output_bytes += job.numel * out_size * (1 + len(job.aliases))
        if not job.merge:
            copy_bytes += job.numel * itemsize
            peak = max(peak, job.numel * itemsize)
            continue
        per_entry = bytes_per_entry(n_models, itemsize, out_size, fused=fused) + extra_bytes_per_entry
        budget = work_budget if whole_tensors else min(work_budget, SPEED_CHUNK_ENTRIES * per_entry)
        rows = rows_per_chunk(job.shape, per_entry, budget)
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
        read = job.numel * itemsize * (n_models + 1)
        bytes_per_pass += read
        if len(pieces) > 1:
            extra += read * chunked_scope_passes
        peak = max(peak, max(c.numel for c in pieces) * per_entry)
    notes = []
    chunked = [name for name, c in chunks.items() if len(c) > 1]
    if chunked:
        notes.append(f"{len(chunked)} tensor(s) merged in row chunks, e.g. {chunked[0]!r} in {len(chunks[chunked[0]])}")
    return Plan(chunks, alignment.jobs, bytes_per_pass, copy_bytes, selection_passes + 1,
                peak + FIXED_OVERHEAD, memory_budget, output_bytes, tuple(notes), extra)
