"""Stream base and task models through the interference statistics, like a merge: row chunks
under the memory budget, the next chunk read on a thread while this one is counted.

Three passes over the merged tensors: (1) magnitude histograms of every task vector (they are
the first radix-select pass and the redundancy curves at once), (2) the second radix-select
pass, which pins each model's exact top-k threshold, (3) every statistic that needs the
thresholds: sign patterns, per-tensor conflicts, mask overlaps, kept mass, merged magnitudes.
Memory: one chunk of every input (twice, for the read-ahead), its float32 task vectors, and
fixed-size blocks of temporaries, whatever the model size.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..engine import fused
from ..engine.plan import Chunk, Plan, make_plan
from ..engine.reader import EngineInputs, Reader
from ..engine.reduce import Reducer
from ..engine.select import WindowSelect
from ..errors import ConfigError
from ..io.align import Alignment
from ..io.checkpoint import Checkpoint
from ..lazy import torch
from ..methods import ops
from ..methods.base import Requirements, TopK, _shown
from . import stats

__all__ = ["AnalysisSettings", "run_analysis", "DEFAULT_CURVE"]

DEFAULT_CURVE = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MAX_CURVE_POINTS = 1000  # densities of the redundancy curves one analysis draws
_BLOCK = 1 << 18  # entries per block of statistics: bounded temporaries (about 40 n MB)


@dataclass(frozen=True)
class AnalysisSettings:
    density: float = 0.2  # top-k fraction that counts as "kept" / "influential" (the paper's k)
    curve: tuple[float, ...] = DEFAULT_CURVE  # densities of the redundancy curves
    subsets_per_size: int | None = 10  # sign conflicts: seeded sample per subset size; None = every subset
    seed: int = 0

    def check(self, n_models: int) -> None:
        problems: list[str] = []
        def number(value: object) -> bool:  # True is no density (hp66a c23: written into the report as true)
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not (number(self.density) and 0 < self.density <= 1):
            problems.append(f"density must be a fraction in (0, 1], got {self.density!r}"
                            + (" (a fraction, not a percent)" if isinstance(self.density, (int, float))
                               and self.density > 1 else ""))
        bad = next((k for k in self.curve if not (number(k) and 0 < k <= 1)), None) if self.curve else ()
        if bad is not None:  # the value at fault, not a curve of 100,000 densities
            problems.append(f"curve densities must be fractions in (0, 1], got {_shown(bad)}"
                            + (" (an empty curve)" if bad == () else ""))
        elif len(set(self.curve)) > MAX_CURVE_POINTS:  # (hp67a c72: 100,000 points ran 55 s, unbounded)
            problems.append(f"curve holds {len(set(self.curve)):,} densities; at most {MAX_CURVE_POINTS:,} (the curves "
                            "are read from 2^16-bin magnitude histograms: more points add no detail)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            problems.append(f"seed must be a whole number from 0 to {2**32 - 1:,}, got {_shown(self.seed)}")  # c57
        if self.subsets_per_size is not None and not (isinstance(self.subsets_per_size, int) and not isinstance(
                self.subsets_per_size, bool) and self.subsets_per_size >= 1):
            problems.append(f"subsets_per_size must be a whole number of at least 1 (or None for all), got "
                            f"{_shown(self.subsets_per_size)}")
        if n_models < 2:
            problems.append(f"interference needs at least 2 fine-tuned models, got {n_models}")
        if n_models > stats.MAX_MODELS:
            problems.append(f"{n_models} models given; the analysis counts 3^n sign patterns and takes at most "
                            f"{stats.MAX_MODELS}")
        hint = "e.g. tiesmerge analyze --base B --model A --model C --density 0.2 -o R"
        if n_models > stats.MAX_MODELS:  # (hp87a c110: the example said nothing of the count)
            hint = (f"analyze {stats.MAX_MODELS} models or fewer (a subset of them; --subsets-per-size thins the "
                    "subsets each statistic averages over, not the sign patterns counted)")
        if problems:
            raise ConfigError(problems, hint=hint)


def _layer_and_module(name: str) -> tuple[int | None, str]:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'model.layers.*.mlp.up_proj.weight')."""
    match = re.search(r"(?:^|\.)([0-9]{1,9})(?=\.|$)", name)  # no int() of a 5000-digit component
    if match is None:
        return None, name
    start, end = match.span(1)
    return int(match.group(1)), name[:start] + "*" + name[end:]


def _subsets(n: int, per_size: int | None, seed: int) -> dict[int, list[tuple[int, ...]]]:
    rng = random.Random(seed)
    chosen = {}
    for size in range(2, n + 1):
        every = list(itertools.combinations(range(n), size))
        chosen[size] = sorted(rng.sample(every, per_size)) if per_size is not None and len(every) > per_size else every
    return chosen


def _task_vectors(reader: Reader, chunks: Sequence[Chunk]) -> Iterator[tuple[Chunk, torch.Tensor]]:
    """Yield (chunk, tau (n, E) float32 on the device), read ahead on a thread."""
    for chunk, payload in reader.stream(chunks):
        yield chunk, reader.task_vectors(chunk, payload).tau.reshape(reader.n, -1)


def _blocks(tau: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, tau.shape[1], _BLOCK):
        yield tau[:, start:start + _BLOCK]  # (n, <= _BLOCK)


def run_analysis(base: Checkpoint, models: list[Checkpoint], alignment: Alignment, settings: AnalysisSettings, *,
                 device: torch.device, memory_budget: int, progress: Callable[[int], None] | None = None,
                 merged: Sequence[tuple[str, Checkpoint]] = ()) -> dict:
    """Every statistic of the report, as a JSON-ready dict (see analysis/report.py for its reading).

    ``merged``: (label, checkpoint) of merges by other methods, read beside the models in the
    statistics pass: their merged task vectors join the four merges of the magnitude section."""
    started = time.perf_counter()
    device = torch.device(device)  # the analysis computes with torch everywhere
    n = len(models)
    settings.check(n)
    plan: Plan = make_plan(alignment, n, Requirements(trim=TopK(settings.density)), memory_budget=memory_budget,
                           out_dtype=torch.float32)
    merged_jobs = [j for j in alignment.jobs if j.merge]
    chunks = [c for j in merged_jobs for c in plan.chunks_by_job[j.name]]
    numel = alignment.merged_numel()
    if numel == 0:
        raise ConfigError("the models have no floating-point tensors to compare")
    # the engine's reader: raw rows where the counting kernel can read them, task vectors for the rest
    reader = Reader(EngineInputs(base, tuple(models)), raw=fused.available() and device.type == "cpu",
                    device=device, progress=progress)
    reducer = Reducer(reader)
    seconds: dict[str, float] = {}

    # -- pass 1: magnitude histograms = radix select's first pass + the redundancy curves
    clock = time.perf_counter()
    counts = torch.zeros(n, stats.MAGNITUDE_BINS, dtype=torch.int64, device=device)
    # pairs of models whose task vectors are equal so far: a model given twice under two paths (a mistyped
    # folder) is said in the report; a pair is dropped at its first difference, usually in the first chunk
    same = {(s, t) for s in range(n) for t in range(s + 1, n)}
    for _, tau in _task_vectors(reader, chunks):
        for block in _blocks(tau):
            counts += stats.magnitude_counts(block)
        same = {(s, t) for s, t in same if torch.equal(tau[s], tau[t])}
    keep = ops.keep_count(numel, settings.density)
    # the magnitude bins are the high 16 bits of |tau|: the bin holding each model's k-th largest
    # brackets its threshold, and one counting pass inside that bin finds it exactly
    at_or_above = counts.cpu().flip(1).cumsum(1).flip(1)  # (n, 2^16) entries in bins >= b
    chosen = ((at_or_above >= keep).sum(1) - 1).clamp_min(0).numpy().astype(np.uint32)
    selector = WindowSelect([keep] * n, device, bracket=(chosen << 16, (chosen << 16) | 0xFFFF))
    seconds["histograms"] = time.perf_counter() - clock

    # -- pass 2: inside each model's threshold bin
    clock = time.perf_counter()
    while not selector.done:
        for chunk, payload in reader.stream(chunks):
            reducer.count(selector, chunk, payload)  # the engine's counting kernel on raw rows, or torch
        selector.end_pass()
    thresholds = selector.thresholds().to(device)  # (n,)
    seconds["select"] = time.perf_counter() - clock

    # -- pass 3: everything that depends on what each model keeps
    clock = time.perf_counter()
    patterns = torch.zeros(3**n, dtype=torch.int64, device=device)
    intersections = torch.zeros(n, n, dtype=torch.int64, device=device)
    mass = torch.zeros(4, n, dtype=torch.float64, device=device)  # kept L1, kept L2^2, total L1, total L2^2
    tables = stats.pattern_tables(n, device)
    groups = 3 * (n + 1)  # influence (0, 1, >1) x agreement (0..n): one joint bincount, marginals at the end
    variants = [*stats.VARIANTS, *(label for label, _ in merged)]
    moments = torch.zeros(3, len(variants), groups, dtype=torch.float64, device=device)
    per_tensor: dict[str, dict[str, int]] = {}
    # the other methods' merges, chunk by chunk in step with the models: (M, E) merged - base
    others = Reader(EngineInputs(base, tuple(c for _, c in merged)), raw=False, device=device) if merged else None
    extra_rows = _task_vectors(others, chunks) if others is not None else itertools.repeat((None, None))
    for (chunk, tau), (_, others_tau) in zip(_task_vectors(reader, chunks), extra_rows):
        row = per_tensor.setdefault(chunk.job.name, {"numel": 0, "conflicts": 0, "kept_by_two_or_more": 0})
        others_blocks = _blocks(others_tau) if others_tau is not None else itertools.repeat(None)
        for block, others_block in zip(_blocks(tau), others_blocks):
            kept = stats.kept_mask(block, thresholds)  # (n, B)
            codes = stats.sign_pattern_codes(block, kept)  # (B,)
            block_patterns = torch.bincount(codes, minlength=3**n)  # (3^n,)
            patterns += block_patterns
            intersections += stats.mask_intersections(kept)
            mass += stats.kept_mass(block, kept)
            row["numel"] += block.shape[1]
            for key, value in stats.tensor_conflicts(block_patterns, tables).items():
                row[key] += value
            joint = stats.influence_groups(codes, tables) * (n + 1) + stats.agreement_groups(block)  # (B,)
            values = torch.stack(list(stats.merge_variants(block, kept).values()))  # (4, B)
            if others_block is not None:
                values = torch.cat([values, others_block])  # (4 + M, B)
            moments += stats.group_moments(values, joint, groups)
    seconds["statistics"] = time.perf_counter() - clock

    data = {
        "settings": {**asdict(settings), "curve": list(settings.curve)},
        "n_models": n,
        "parameters": numel,
        "kept_per_model": keep,
        # a model that keeps nothing has an infinite threshold: null, which strict JSON readers accept (Infinity: no)
        "thresholds": [float(x) if math.isfinite(float(x)) else None for x in thresholds.cpu()],
        "sign_conflicts": _conflicts(patterns.cpu().numpy(), n, numel, settings),
        "by_tensor": _by_tensor(per_tensor),
        "redundancy": _redundancy(counts.cpu().numpy(), mass.cpu().numpy(), numel, settings),
        "overlap": _overlap(intersections.cpu().numpy(), numel),
        "identical_pairs": sorted([s, t] for s, t in same),
        "magnitudes": {"by_influence": _moments(moments.view(3, len(variants), 3, n + 1).sum(3), ["0", "1", ">1"],
                                                variants),
                       "by_agreement": _moments(moments.view(3, len(variants), 3, n + 1).sum(2),
                                                [f"{j}/{n}" for j in range(n + 1)], variants)},
        "engine": {"device": str(device), "memory_budget_bytes": memory_budget,
                   "estimated_peak_bytes": plan.peak_bytes + _block_bytes(n), "passes": 3,
                   "bytes_read": reader.bytes_read, "chunks_per_pass": len(chunks)},
    }
    seconds["total"] = time.perf_counter() - started
    data["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return data


def _block_bytes(n: int) -> int:
    """Temporaries of one block of statistics: about ten (n, B) float32/bool/int64 arrays."""
    return 40 * n * _BLOCK


def _conflicts(patterns: np.ndarray, n: int, numel: int, settings: AnalysisSettings) -> dict:
    tables = stats.pattern_tables(n)
    sizes = []
    for size, subsets in _subsets(n, settings.subsets_per_size, settings.seed).items():
        rows = []
        for subset in subsets:
            c = stats.subset_conflicts(patterns, tables, subset)
            rows.append({"models": list(subset), **c, "of_parameters": c["conflicts"] / numel,
                         "of_kept_by_two_or_more": c["conflicts"] / max(1, c["kept_by_two_or_more"])})
        of_params = [r["of_parameters"] for r in rows]
        of_contested = [r["of_kept_by_two_or_more"] for r in rows]
        sizes.append({"size": size, "subsets": rows, "total_subsets": len(list(itertools.combinations(range(n), size))),
                      "mean_of_parameters": float(np.mean(of_params)), "min_of_parameters": float(np.min(of_params)),
                      "max_of_parameters": float(np.max(of_params)),
                      "mean_of_kept_by_two_or_more": float(np.mean(of_contested)),
                      "min_of_kept_by_two_or_more": float(np.min(of_contested)),
                      "max_of_kept_by_two_or_more": float(np.max(of_contested))})
    return {"by_size": sizes,
            "denominators": {"of_parameters": "all merged parameters (the paper's Fig. 4)",
                             "of_kept_by_two_or_more": "parameters that two or more of the subset's models keep "
                                                       "(the only ones where signs can conflict)"}}


def _by_tensor(per_tensor: dict[str, dict[str, int]]) -> list[dict]:
    rows = []
    for name, row in per_tensor.items():
        layer, module = _layer_and_module(name)
        rows.append({"name": name, "layer": layer, "module": module, **row,
                     "of_parameters": row["conflicts"] / max(1, row["numel"]),
                     "of_kept_by_two_or_more": row["conflicts"] / max(1, row["kept_by_two_or_more"])})
    return rows


def _redundancy(counts: np.ndarray, mass: np.ndarray, numel: int, settings: AnalysisSettings) -> dict:
    kept1, kept2, total1, total2 = mass  # (n,) each, exact
    mid = stats.bin_midpoints()  # (2^16,)
    l1, l2 = counts * mid, counts * mid**2  # (n, 2^16) mass per bin, to within half a bin's width
    curve = sorted(set(settings.curve))
    keeps = [ops.keep_count(numel, k) for k in curve]
    return {"densities": curve,
            "l1_share": [[stats.topk_mass_share(counts[t], l1[t], m) for m in keeps] for t in range(len(counts))],
            "l2_share": [[stats.topk_mass_share(counts[t], l2[t], m) for m in keeps] for t in range(len(counts))],
            "at_density": {"density": settings.density,
                           "l1_share": [float(a / b) if b else 0.0 for a, b in zip(kept1, total1)],
                           "l2_share": [float(a / b) if b else 0.0 for a, b in zip(kept2, total2)],
                           "l1_total": [float(b) for b in total1]},
            "note": "curves from 2^16-bin magnitude histograms (each bin's mass = count x bin midpoint, within "
                    "0.4% of the exact value; the bin holding the k-th value counts pro rata); at_density is exact"}


def _overlap(intersections: np.ndarray, numel: int) -> dict:
    kept = np.diag(intersections).astype(np.float64)
    union = kept[:, None] + kept[None, :] - intersections
    jaccard = np.where(union > 0, intersections / np.maximum(union, 1), 0.0)
    n = len(kept)
    pairs = [jaccard[s, t] for s in range(n) for t in range(s + 1, n)]
    density = float(kept.mean() / numel)
    return {"intersections": intersections.tolist(), "jaccard": jaccard.tolist(),
            "mean_pairwise_jaccard": float(np.mean(pairs)) if pairs else 0.0,
            # two independent random masks of density k overlap in k^2 of the entries: Jaccard k / (2 - k)
            "independent_masks_jaccard": density / (2 - density) if density < 2 else 1.0}


def _moments(moments: torch.Tensor, labels: list[str], variants: Sequence[str] = stats.VARIANTS) -> dict:
    """moments: (3, V, G) count, sum |x|, sum x^2 per variant and group."""
    count, total, squares = (m.cpu().numpy() for m in moments)  # (V, G) each
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    var = np.divide(squares, count, out=np.zeros_like(total), where=count > 0) - mean**2
    std = np.sqrt(np.maximum(var, 0))
    return {"groups": labels, "count": [int(c) for c in count[0]],
            "mean": {v: [float(x) for x in mean[i]] for i, v in enumerate(variants)},
            "std": {v: [float(x) for x in std[i]] for i, v in enumerate(variants)}}
