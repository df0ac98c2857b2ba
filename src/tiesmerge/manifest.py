"""The ``tiesmerge.json`` manifest of a merge: what was merged, from which files (sha256), how.

Every input is listed under its role: the base, the models in order, and the method's
reference model under the name of the option that gave it (TIES's ``sign_from``); then the
recipe, the thresholds found (one per model), the alignment, the output and the engine's
figures (bytes read, passes made against planned, estimated peak memory, seconds).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine.executor import Executor, RunStats
from .errors import IncompatibleCheckpointsError
from .methods.base import ModelPath, option_types
from .recipe import MergeRecipe

if TYPE_CHECKING:
    from .stats.files import StatsSource
from .version import __version__

__all__ = ["merge_manifest", "reference_option", "check_stats_digests"]


def reference_option(method: Any) -> str:
    """The name of the option holding the method's reference model (e.g. ``sign_from``)."""
    reference = method.requirements().reference
    types = option_types(type(method))
    return next((f.name for f in dataclasses.fields(method)
                 if types[f.name] is ModelPath and getattr(method, f.name) == reference), "reference")


def check_stats_digests(opened: list[StatsSource], hashed_models: list[list[dict]], labels: list[str]) -> None:
    """Statistics computed from a model directory record its files' digest: they must be this model's."""
    if not opened:  # only data-aware methods read statistics (and the module needs torch)
        return
    from .stats.files import combine_digests, config_digest, tokenizer_digest

    for k, (src, files) in enumerate(zip(opened, hashed_models)):  # opened is empty for other methods
        recorded = src.manifest.model_digest if src.manifest is not None else None
        if not recorded or not recorded.startswith("files:") or not files:
            continue
        actual = "files:" + combine_digests([(Path(f["path"]).name, f["sha256"]) for f in files])
        if actual != recorded:
            same_place = src.manifest.model is not None and os.path.realpath(str(src.manifest.model)) == \
                os.path.realpath(str(Path(files[0]["path"]).parent))
            if same_place:  # the same folder, its weights re-saved since (hp58 c48: "another model (m), not (m)")
                # the path is the same; what it names may not be (a link re-pointed since: hp77b c12)
                relinked = any(os.path.islink(p) for p in (str(src.manifest.model), labels[k]))
                raise IncompatibleCheckpointsError(
                    f"{src.label}: these statistics were computed with model {k} ({labels[k]}) as its weights were "
                    "then: its weight files changed since (their digests differ)"
                    + (", or the link now names another model" if relinked else ""),
                    hint="recompute the statistics with the model as it is now (tiesmerge stats)")
            raise IncompatibleCheckpointsError(
                f"{src.label}: these statistics were computed with another model ({src.manifest.model}), "
                f"not model {k} ({labels[k]}): the weight files' digests differ",
                hint="give each model its own statistics, in the models' order, or recompute them")
        tokenizer = src.manifest.tokenizer_digest
        if tokenizer is not None and tokenizer_digest(Path(files[0]["path"]).parent) != tokenizer:
            raise IncompatibleCheckpointsError(
                f"{src.label}: these statistics were computed with the same weights as model {k} ({labels[k]}) but "
                "another tokenizer (its tokenizer files changed since): they describe texts encoded otherwise",
                hint="recompute the statistics with the model's tokenizer as it is now (tiesmerge stats)")
        config = src.manifest.config_digest
        if config is not None and config_digest(Path(files[0]["path"]).parent) != config:
            raise IncompatibleCheckpointsError(
                f"{src.label}: these statistics were computed with the same weights as model {k} ({labels[k]}) but "
                "another config.json (it changed since): the model it builds is another function, whose activations "
                "and gradients these are not",
                hint="recompute the statistics with the model as it is now (tiesmerge stats), or restore its config")


def merge_manifest(recipe: MergeRecipe, executor: Executor, stats: RunStats, hashed: dict[str, Any],
                   files: list[str], copied: list[str]) -> dict[str, Any]:
    """``hashed``: {"base": files, "models": [files, ...], "reference": files or None}."""
    inputs: dict[str, Any] = {"base": {"label": recipe.base, "files": hashed["base"]},
                              "models": [{"label": label, "files": h}
                                         for label, h in zip(recipe.models, hashed["models"], strict=True)]}
    if executor.inputs.reference is not None:  # a named input, never one of the models
        inputs[reference_option(recipe.method)] = {"label": executor.inputs.reference.label,
                                                   "files": hashed["reference"]}
    return {
        "tiesmerge_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.to_dict(),
        "method": {"name": recipe.method.name, "paper": recipe.method.paper,
                   "options": recipe.to_dict()["parameters"]},
        "inputs": inputs,
        "alignment": {"tied": [list(g) for g in executor.alignment.tied],
                      "truncated": list(executor.alignment.truncated), "vocab_policy": recipe.vocab_policy,
                      **({"vocabulary": dict(executor.alignment.vocab)} if executor.alignment.vocab else {})},
        "tensors": {"merged": stats.tensors_merged, "copied": stats.tensors_copied, "tied_aliases": stats.tensors_tied},
        "thresholds": stats.thresholds,
        "output": {"files": files, "copied_from_base": copied, "dtype": recipe.dtype or "same as base"},
        "engine": {"device": str(executor.device), "arithmetic": stats.engine,
                   "memory_budget_bytes": executor.plan.memory_budget,
                   "estimated_peak_bytes": executor.plan.peak_bytes, "passes": stats.passes,
                   "planned_passes": executor.plan.passes, "pass_names": list(executor.plan.pass_names),
                   "bytes_read": stats.bytes_read, "per_tensor_reduction_bytes": stats.reduce_bytes,
                   "sample_bytes": stats.sample_bytes, "fused_chunks": stats.fused_chunks,
                   "torch_chunks": stats.torch_chunks},
        "seconds": {k: round(v, 4) for k, v in stats.seconds.items()},
    }
