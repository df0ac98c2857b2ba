"""Learning the coefficients: entropy on unlabeled inputs (or cross-entropy on labelled ones), Adam, checkpoints
that resume exactly.

AdaMerging (Yang et al., ICLR 2024) merges theta = theta_0 + sum_t lambda_t v_t and learns the
lambdas by minimising, summed over the tasks, the mean Shannon entropy of the merged model's
predictions on a batch of each task's unlabeled inputs. Task-wise: one lambda per task, shape
(T, 1); layer-wise: one per task and *parameter tensor*, shape (T, L), L the number of merged
tensors (FusionBench's layer-wise grouping: every parameter tensor, weights, biases and norms
alike, is its own "layer"). theta is a function of lambda (``torch.func.functional_call``), so
memory is the base, the T vectors, theta and its gradient, and one task's activations.

Batches are a function of (seed, task, step) only: each task's examples are reshuffled per
pass with a generator seeded from (seed, task, pass), so a run resumed from a checkpoint draws
the same batches as one that never stopped.

``objective="cross_entropy"`` minimises instead the mean cross-entropy against each example's
``label`` (its class index): the coefficients then learn from labelled data, e.g. a validation
split, as aTLAS (Zhang et al., NeurIPS 2024) learns its anisotropic scalings with few labelled
examples. The entropy objective needs no labels, but also rewards confident wrong answers.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MergeWarning, TrainingError
from ..evaluation.forward import TaskForward, checkpoint_names, entropy, logits
from ..lazy import torch
from ..limits import finite_float
from ..methods.base import FLOAT32_MAX
from ..methods.base import _shown as _bounded
from ..paths import as_if_created

__all__ = ["GRANULARITIES", "OBJECTIVES", "AdaptConfig", "Merger", "History", "learn", "batch_rows", "total_entropy"]

GRANULARITIES = ("task", "layer")
OBJECTIVES = ("entropy", "cross_entropy")  # unlabeled inputs (the paper), or labelled ones
MAX_LR = 10.0  # Adam moves each coefficient by about lr per step
MAX_INIT = 1000.0
MAX_BATCH = 65536  # examples per task and step: AdaMerging uses 16; one forward pass holds them all


MAX_OBJECTIVE = 1e6  # an entropy (at most ln classes) or a cross-entropy of float32 logits: far below
MAX_STEPS = 10**9  # optimizer steps of one run: far past any (the paper's: 500), and exact in a checkpoint's count


@dataclass(frozen=True)
class AdaptConfig:
    """The optimisation, with the paper's defaults (AdaMerging, Sec. 5 and its code; FusionBench
    agrees except for 1000 steps)."""

    granularity: str = "layer"  # "task": one coefficient per task; "layer": per task and parameter tensor
    steps: int = 500  # optimizer steps; each sees one batch of every task
    lr: float = 1e-3  # Adam's learning rate
    batch_size: int = 16  # unlabeled examples per task and step
    init: float = 0.3  # every coefficient's starting value
    seed: int = 0  # of the batches' shuffling
    clamp: tuple[float, float] | None = None  # keep every coefficient in [low, high] after each step (None: free)
    checkpoint_every: int | None = None  # steps between checkpoints (None: one pass over the largest task's data)
    objective: str = "entropy"  # or "cross_entropy": against each row's integer "label"

    def problems(self) -> list[str]:
        out = []
        if self.granularity not in GRANULARITIES:
            out.append(f"granularity={self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if self.objective not in OBJECTIVES:
            out.append(f"objective={self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        for key in ("steps", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "steps" else 1):
                out.append(f"{key} must be an integer >= {0 if key == 'steps' else 1}, got {_bounded(value)}")
        if isinstance(self.steps, int) and self.steps > MAX_STEPS:  # 10**400 ran until killed (hp59b c29)
            out.append(f"steps must be at most {MAX_STEPS:,}, got {_bounded(self.steps)} (a run that never ends; "
                       "AdaMerging converges in a few hundred)")
        for key in ("lr", "init"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not _finite(value):
                out.append(f"{key} must be a finite number, got {_bounded(value)}")  # 10**400: no float (hp59b c30)
        finite = {k for k in ("lr", "init") if isinstance(getattr(self, k), (int, float))
                  and not isinstance(getattr(self, k), bool) and _finite(getattr(self, k))}  # a NaN said once (N5)
        if "lr" in finite and not 0 < self.lr <= MAX_LR:
            out.append(f"lr must be in (0, {MAX_LR:g}], got {self.lr!r} (coefficients live near 0.3 to 1: a larger "
                       "step throws them past any useful merge)")
        if isinstance(self.batch_size, int) and self.batch_size > MAX_BATCH:  # the batch's rows are listed and encoded
            out.append(f"batch_size must be at most {MAX_BATCH:,} examples per task and step, got {self.batch_size:,} "
                       "(one forward pass holds the whole batch; a batch larger than a task's data repeats its rows)")
        if "init" in finite and abs(self.init) > MAX_INIT:
            out.append(f"init must be within ±{MAX_INIT:g}, got {self.init!r}")
        if self.clamp is not None and (len(self.clamp) != 2 or not self.clamp[0] < self.clamp[1]):
            out.append(f"clamp must be (low, high) with low < high, got {self.clamp!r}")
        elif self.clamp is not None and not all(_finite(v) for v in self.clamp):  # hp35 E59: -inf inf went
            # into the manifest as -Infinity/Infinity, which strict JSON readers refuse; unbounded is no clamp
            out.append(f"clamp must be two finite numbers, got {tuple(self.clamp)!r} (leave --clamp out for "
                       "coefficients without bounds)")
        elif self.clamp is not None and "init" in finite and not self.clamp[0] <= self.init <= self.clamp[1]:
            # the first step's objective was measured at init, then every coefficient jumped into the clamp (D36)
            out.append(f"init {self.init:g} lies outside clamp [{self.clamp[0]:g}, {self.clamp[1]:g}]: the "
                       "coefficients would start where the clamp never lets them be (give --init inside --clamp)")
        if self.checkpoint_every is not None and (not isinstance(self.checkpoint_every, int)
                                                  or self.checkpoint_every < 1):
            out.append(f"checkpoint_every must be a positive integer, got {self.checkpoint_every!r}")
        return out


class Merger:
    """theta(lambda) = base + sum_t lambda[t, layer] v_t for every merged tensor, differentiable in lambda.

    ``base``: name -> (*S) tensor, ``vectors``: name -> (T, *S), both on the device the forward
    runs on; ``names`` the merged tensors in order; ``dtypes``: the dtype each merged tensor is
    handed to the forward in (its module's, e.g. bfloat16), default float32."""

    def __init__(self, base: Mapping[str, torch.Tensor], vectors: Mapping[str, torch.Tensor], names: Sequence[str],
                 granularity: str, dtypes: Mapping[str, torch.dtype] | None = None) -> None:
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity={granularity!r} is not one of {', '.join(GRANULARITIES)}")
        self.base, self.vectors, self.names = base, vectors, list(names)
        self.granularity = granularity
        self.layer = {name: (i if granularity == "layer" else 0) for i, name in enumerate(self.names)}
        self.dtypes = dict(dtypes or {})
        self.n_tasks = next(iter(vectors.values())).shape[0] if vectors else 0
        self.unused: frozenset[str] = frozenset()  # merged tensors the forward never reads (check_forward_names)

    @property
    def shape(self) -> tuple[int, int]:
        """(T, L): L = 1 task-wise, the number of merged tensors layer-wise."""
        return self.n_tasks, (len(self.names) if self.granularity == "layer" else 1)

    def tensor(self, name: str, lam: torch.Tensor) -> torch.Tensor:
        """One merged tensor: base + sum_t lam[t, layer] v_t, (*S). The same operations, in the same
        order, as the final merge's (run.LearnedMerge), so the written model is the one evaluated."""
        v = self.vectors[name]  # (T, *S)
        merged = self.base[name].to(v.dtype) + combine(lam[:, self.layer[name]].to(v.dtype), v)
        return merged.to(self.dtypes.get(name, merged.dtype))

    def params(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name, lam) for name in self.names if name not in self.unused}


def combine(coefficients: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(T,), (T, *S) -> (*S): sum_t c_t v_t as one matrix-vector product, with no (T, *S)
    temporary forward or backward (the gradient of c is v @ grad, one more product)."""
    return (coefficients @ vectors.reshape(vectors.shape[0], -1)).view(vectors.shape[1:])


def check_forward_names(forward: TaskForward, names: Sequence[str]) -> frozenset[str]:
    """Most merged tensors must be weights of the forward (else functional_call would ignore them: another
    architecture or naming is refused). Those the forward declares it never reads (``unused_prefixes``: the encoder
    forward's mean pooling has no pooler) and a few its model lacks (an MLM head a classifier's checkpoint kept) are
    returned, and said: their coefficients get no gradient and stay at the initial value."""
    held = checkpoint_names(forward)
    unused_prefixes = tuple(getattr(forward, "unused_prefixes", ()))
    unused = frozenset(n for n in names if n not in held and unused_prefixes and n.startswith(unused_prefixes))
    if unused:
        warnings.warn(MergeWarning(
            f"{len(unused)} merged tensor(s) are not read by the forward ({', '.join(sorted(unused)[:3])}"
            f"{', ...' if len(unused) > 3 else ''}): they are merged with the coefficients they start from "
            "(--init), which nothing adapts"), stacklevel=3)
    missing = [n for n in names if n not in held and n not in unused]
    if missing and len(missing) * 2 > len(names):  # another architecture, or another naming: nothing would adapt
        some = sorted(held)[:3]
        raise ConfigError(f"{len(missing)} of the {len(names)} merged tensors are not weights of the forward's model, "
                          f"e.g. {missing[:3]} (the model's weights are named like {some})",
                          hint="the forward must be the base's architecture, its weights named like the checkpoint "
                          "(on the command line: --forward classifier for *ForSequenceClassification, choice for a "
                          "causal LM, encoder for a bare encoder; in Python, FunctionLogits: pass the module whose "
                          "state_dict() keys are the checkpoint's names)")
    if missing:  # a few the forward's model lacks (an MLM head left from pretraining, hp34 D93): as the pooler above
        warnings.warn(MergeWarning(
            f"{len(missing)} merged tensor(s) are not weights of the forward's model ({', '.join(sorted(missing)[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): they are merged with the coefficients they start from "
            "(--init), which nothing adapts"), stacklevel=3)
    return unused | frozenset(missing)


def _warn_stuck(row: list[float], config: AdaptConfig, merger: Merger | None = None) -> None:
    """Every coefficient's gradient is exactly 0 at the first step: nothing will move them (hp40 X2: models whose
    logits were huge gave entropy 0 on every input, and the run ended at --init without a word). Task vectors that
    are all zero (the method's options keep nothing) are that cause, said as such (hp63b c33: "check the logits")."""
    if merger is not None and not any(bool(v.any()) for v in merger.vectors.values()):
        warnings.warn(MergeWarning(
            "every task vector the method hands AdaMerging is zero (its options keep no entry: a density too small "
            "for the model?), so there is nothing to weigh and the coefficients stay at --init "
            f"{config.init:g}; the merge is the base itself"), stacklevel=4)
        return
    saturated = config.objective == "entropy" and max(row) < 1e-6
    warnings.warn(MergeWarning(
        "every coefficient's gradient is 0 at the first step, so the coefficients stay at --init "
        f"{config.init:g}" + (": the merged model's predictions are saturated (entropy 0 on every task: one class "
                              "takes all the probability)" if saturated else "") +
        "; check the models' logits (huge weights) or start from another --init"), stacklevel=4)


def _warn_unmoved(steps: int, rows: list[list[float]], config: AdaptConfig, start: torch.Tensor) -> None:
    """No coefficient moved over the run's steps, though the first gradient was not exactly 0. Said with its cause:
    a --clamp whose bounds are one float32 value, an --lr below float32's spacing at the coefficients (Adam's step
    is about lr, hp73b c12, c23), or gradients so small (a saturated softmax: entropy ~0 everywhere) that Adam's
    steps vanish (hp71b c40: "mean entropy 0.0 -> 0.0", every coefficient at --init, said nowhere)."""
    largest = max((max(r) for r in rows), default=0.0)
    spacing = float(torch.finfo(torch.float32).eps) * float(start.abs().max()) / 2  # half an ulp: rounds away
    if float(torch.tensor(config.lr, dtype=torch.float32)) == 0.0:  # 1e-50: 0 in float32 (hp74b c23: with --init 0
        # the spacing test below has nothing to compare against)
        why = f", since --lr {config.lr:g} is 0 in float32, where the coefficients are kept; give a larger --lr"
    elif config.clamp is not None and torch.tensor(config.clamp[0], dtype=torch.float32) == torch.tensor(
            config.clamp[1], dtype=torch.float32):
        why = (f", since --clamp {config.clamp[0]:g} {config.clamp[1]:g} is one value in float32, which the "
               "coefficients are clamped to after every step; give bounds apart")
    elif config.lr <= spacing:
        why = (f", since --lr {config.lr:g} is below float32's spacing at the coefficients ({spacing:.2g}): Adam's "
               "steps, about lr each, round away; give a larger --lr (the paper's is 1e-3)")
    elif config.objective == "entropy" and largest < 1e-6:
        why = (f", since the merged model's predictions are saturated (entropy at most {largest:.3g} on every task: "
               "one class takes all the probability, so the gradients are too small to move them); check the "
               "models' logits (huge weights), or start from another --init")
    else:
        why = (", the gradients too small to move them; check the models' logits (huge weights), or start from "
               "another --init")
    warnings.warn(MergeWarning(
        f"no coefficient moved over the {steps:,} step{'s' if steps != 1 else ''}: they are their starting values "
        f"(--init, or the checkpoint's){why}"), stacklevel=4)


def batch_rows(rows: Sequence[Any], step: int, batch_size: int, seed: int, task_index: int) -> list[Any]:
    """The rows of ``step``'s batch of one task: positions step*B .. step*B+B-1 of the endless
    sequence of per-pass permutations (pass p shuffled by a generator seeded from (seed, task, p))."""
    n = len(rows)
    out, perms = [], {}
    for k in range(step * batch_size, (step + 1) * batch_size):
        p, i = divmod(k, n)
        if p not in perms:
            g = torch.Generator().manual_seed((seed * 1_000_003 + task_index * 7919 + p) % (2 ** 63))
            perms[p] = torch.randperm(n, generator=g).tolist()
        out.append(rows[perms[p][i]])
    return out


def total_entropy(forward: TaskForward, merger: Merger, lam: torch.Tensor, batches: Mapping[str, Any]) -> torch.Tensor:
    """sum over tasks of the mean entropy of the merged model on that task's batch (a scalar,
    differentiable in ``lam``): the objective, for checks; :func:`learn` backpropagates per task."""
    params = merger.params(lam)
    return sum(entropy(logits(forward, batch, task, params)).mean() for task, batch in batches.items())


def check_labels(data: Mapping[str, Sequence[Any]], sources: Mapping[str, str] | None = None) -> None:
    """Every row of every task holds an integer ``label`` >= 0 (the cross-entropy objective's target): checked
    before the first step, naming the first row that does not, and its data file where ``sources`` (task -> file)
    knows it."""
    for task, rows in data.items():
        where = (sources or {}).get(task) or f"task {task!r}"
        for k, row in enumerate(rows):
            label = row.get("label") if isinstance(row, Mapping) else None
            if isinstance(label, int) and not isinstance(label, bool) and label >= 2**31:  # (hp63b c34: "an integer
                # from 0" said of one that is)
                raise ConfigError(f"{where}: example {k + 1}'s 'label' {_bounded(label)} is past any class index (no "
                                  "model has 2^31 classes)", hint="labels are class indices from 0")
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label:
                raise ConfigError(f"{where}: example {k + 1} has no class index as its 'label' (an integer from "
                                  f"0; got {_bounded(label)}), which "
                                  "the cross_entropy objective needs on every example",
                                  hint='rows like {"text": "...", "label": 2} (the class index); or the default '
                                       "objective, entropy, which needs no labels")


def objective(out: torch.Tensor, rows: Sequence[Any], kind: str) -> torch.Tensor:
    """The scalar minimised for one task's batch: the mean entropy of the predictions ``out`` (B, classes), or
    their mean cross-entropy against the rows' labels (checked against the classes before the first step)."""
    _check_forward_output(out, len(rows))
    if kind == "entropy":
        return entropy(out).mean()
    labels = torch.tensor([row["label"] for row in rows], dtype=torch.long, device=out.device)  # (B,)
    return torch.nn.functional.cross_entropy(out.float(), labels)


def _check_forward_output(out: Any, batch: int) -> None:
    """The forward's result for a batch of ``batch`` rows must be (batch, classes) floating logits that depend on the
    coefficients: a list failed in the entropy as an AttributeError, detached or integer logits in backward() as
    "does not require grad" (hp56 c56), fewer rows than the batch passed (c58)."""
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the forward returned a {type(out).__name__}, not (B, classes) logits",
                          hint="return a tensor of logits, one row per example of the batch")
    if not out.is_floating_point() or out.dim() != 2 or out.shape[0] != batch or out.shape[1] < 2:
        raise ConfigError(f"the forward returned a {str(out.dtype).removeprefix('torch.')} tensor of shape "
                          f"{tuple(out.shape)} for a batch of {batch}, not ({batch}, classes) floating logits with "
                          "two classes or more", hint="return the model's logits, one row per example of the batch")
    if torch.is_grad_enabled() and not out.requires_grad:
        raise ConfigError("the forward's logits do not depend on the merge coefficients (detached, or computed under "
                          "no_grad or from another model than the one it is given)",
                          hint="compute the logits with the model the forward receives, without detach()")


@dataclass
class History:
    """Per step, each task's mean entropy on its batch (before that step's update)."""

    tasks: list[str]
    entropy: list[list[float]] = field(default_factory=list)  # (steps, T)

    def mean(self) -> list[float]:
        return [sum(row) / len(row) for row in self.entropy]


def _fingerprint_check(saved: str, expected: str, path: Path, saved_config: Any = None,
                       config: AdaptConfig | None = None) -> None:
    """The checkpoint must be this run's; where it is not, what differs is named: the settings it records, and the
    parts of its fingerprint (the inputs, method, forward, data) where both are fingerprints of the parts (hp39 C24:
    "another run" without a word of why sent people comparing commands)."""
    if saved == expected:
        return
    differ = []
    if isinstance(saved_config, dict) and config is not None:
        mine = json.loads(json.dumps(asdict(config)))  # as the checkpoint stores it (tuples as lists)
        # named as the command line spells them (hp41 C8: "checkpoint_every 2 there, None now"); the step count and
        # the checkpoints' spacing may change on a resume, so they are never why one is refused
        differ = [f"{_OPTION_NAMES.get(k, k)} {_shown(saved_config[k])} there, {_shown(mine[k])} now" for k in mine
                  if k not in ("steps", "checkpoint_every") and k in saved_config and saved_config[k] != mine[k]]
    parts = _differing_parts(saved, expected)
    if parts == [_DAMAGED]:  # not another run's: no command resumes it (hp70b c46: "resume with the same command")
        raise ConfigError(f"{path}: the checkpoint's fingerprint is {_DAMAGED.removeprefix('its fingerprint is ')}",
                          hint="remove the checkpoint (or restore it) to start afresh")
    differ += parts
    raise ConfigError(f"{path}: this checkpoint is of another run ("
                      + ("; ".join(dict.fromkeys(differ)) if differ else "other models, data, method or forward "
                         "settings: --max-length, --heads, --choices")
                      + ")", hint="resume with the same command and inputs, or remove the checkpoint to start afresh")


# AdaptConfig's fields as `tiesmerge adapt` names them (its --seed is the merge method's: --shuffle-seed is this one)
_OPTION_NAMES = {"granularity": "--granularity", "lr": "--lr", "batch_size": "--batch-size", "init": "--init",
                 "seed": "--shuffle-seed", "clamp": "--clamp", "objective": "--objective",
                 "max_length": "--max-length", "heads": "--heads", "choices": "--choices"}


def _shown(value: Any) -> str:
    return "not set" if value is None else repr(value)


_DAMAGED = "its fingerprint is not one tiesmerge writes (edited or damaged)"


def _differing_parts(saved: str, expected: str) -> list[str]:
    """What differs between two fingerprints of parts (run._fingerprint's JSON), in words; nothing for a digest."""
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) < len(pairs):
            raise ValueError("a key given twice")
        return dict(pairs)

    try:
        now = json.loads(expected)
        there = json.loads(saved, object_pairs_hook=unique)
    except (ValueError, RecursionError):  # a bare digest (a checkpoint written before the parts were kept), or a
        # fingerprint nested past Python's limit (hp54 c09), or one holding a key twice: damage where it looked like
        # one of tiesmerge's (a JSON object)
        return [_DAMAGED] if isinstance(saved, str) and saved.lstrip().startswith("{") else []
    if not (isinstance(there, dict) and isinstance(now, dict)):
        return []
    if there.get("format") != now.get("format"):
        return ["it was written by another version of tiesmerge, which fingerprinted its run otherwise"]
    try:
        return _parts_apart(there, now)
    except (TypeError, KeyError, IndexError, AttributeError, ValueError):  # parts of other shapes (hp54 c24)
        return [_DAMAGED]


def _method_flags(spec: Any) -> str:
    """A fingerprint's method (``ties:density=0.5``, the options that differ from the defaults) as the flags that
    give it (``--method ties --density 0.5``): the spec is no syntax any command takes (hp72b c41)."""
    if not isinstance(spec, str):
        return repr(spec)
    name, _, options = spec.partition(":")
    flags = [f"--method {name}"]
    for item in re.split(r",(?=[A-Za-z_][A-Za-z0-9_]*=)", options) if options else []:
        key, _, text = item.partition("=")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        flag = key.replace("_", "-")
        if isinstance(value, bool):  # --rescale / --no-rescale
            flags.append(f"--{'' if value else 'no-'}{flag}")
        else:
            flags.append(f"--{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return f"`{' '.join(flags)}`" + ("" if options else " (its defaults)")


def _parts_apart(there: dict, now: dict) -> list[str]:
    out = []
    old_inputs, new_inputs = there.get("inputs"), now.get("inputs")  # [[name, stamp of its files], ...], base first
    if old_inputs != new_inputs:
        out.append(_differing_inputs(old_inputs, new_inputs))
    if there.get("method") != now.get("method"):
        out.append(f"the method {_method_flags(there.get('method'))} there, {_method_flags(now.get('method'))} now")
    if there.get("forward") != now.get("forward"):
        out.append(f"the forward {there.get('forward')!r} there, {now.get('forward')!r} now")
    old_settings, new_settings = there.get("forward_settings"), now.get("forward_settings")
    if isinstance(old_settings, dict) and isinstance(new_settings, dict):
        out += [f"{_OPTION_NAMES.get(k, k)} {_shown(old_settings.get(k))} there, {_shown(new_settings.get(k))} now"
                for k in sorted({*old_settings, *new_settings}) if old_settings.get(k) != new_settings.get(k)]
    old_data, new_data = there.get("data"), now.get("data")  # [[task, digest], ...] in the run's order
    if isinstance(old_data, list) and isinstance(new_data, list) and old_data != new_data:
        old_tasks, new_tasks = [str(t[0]) for t in old_data], [str(t[0]) for t in new_data]
        if old_tasks != new_tasks:
            out.append(f"the tasks {old_tasks} there, {new_tasks} now (their order is the coefficients' rows)")
        else:
            out.append("the data of task(s) " + ", ".join(repr(t) for t, a, b in zip(new_tasks, old_data, new_data)
                                                          if a != b)
                       + " (another file, its lines changed, or another --limit)")
    return out


def _differing_inputs(there: Any, now: Any) -> str:
    """Which input differs, in words: the base or model k by its path, another path or the same path whose files
    (weights, configs, tokenizer files) changed since the checkpoint was written."""
    generic = ("the models: another base or fine-tuned model, or their files (weights, configs, tokenizer files) "
               "changed since the checkpoint was written")
    if not (isinstance(there, list) and isinstance(now, list)):
        return generic
    if len(there) != len(now):
        return f"the models: {len(there) - 1} fine-tuned model(s) there, {len(now) - 1} now"
    said = []
    for k, (a, b) in enumerate(zip(there, now)):
        if a == b or not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b) == 2):
            continue
        who = "the base" if k == 0 else f"model {k - 1}"  # 0-based, as every other message
        if a[0] != b[0]:
            said.append(f"{who} {a[0]} there, {b[0]} now")
        else:
            said.append(f"{who} ({b[0]}): its files (weights, configs, tokenizer files) changed since the checkpoint "
                        "was written (their inode, size, modification or change time: a chmod, a new hard link or "
                        "a copy changes the last too)")  # hp48 c14: a hard link made beside was "changed"
    return "; ".join(said) or generic


# The checkpoint is a safetensors file: the coefficients and Adam's moments as tensors, everything
# else (fingerprint, step, entropy history, Adam's settings) as JSON in its metadata. No pickle is
# written or read, so a planted or damaged checkpoint can never run code.
_CHECKPOINT_FORMAT = "tiesmerge-adapt-checkpoint/1"
_CHECKPOINT_MAX_BYTES = 1 << 30  # a (T, L) table and two moments of it: far below this
_ADAM_TENSORS = ("step", "exp_avg", "exp_avg_sq")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as ``_save`` wrote it; anything else (garbage, JSON, a pickle, another
    safetensors file) is a typed error naming the file."""
    import struct

    from safetensors.torch import load as load_tensors

    from ..limits import loads_json
    from ..paths import check_input, read_regular

    def foreign(why: str) -> ConfigError:
        # no advice to remove it: it may be anyone's file (a model's weights, a data file), never ours to replace
        return ConfigError(f"{path}: not a checkpoint tiesmerge adapt wrote ({why})",
                           hint="name this run's checkpoint, or another path to start afresh (tiesmerge leaves this "
                                "file as it is)")

    def damaged(why: str) -> ConfigError:  # ours (its format field says so), but no longer whole
        return ConfigError(f"{path}: the checkpoint is damaged ({why})",
                           hint="remove it (or name another --checkpoint) to start afresh")

    check_input(path, "the checkpoint", error=ConfigError)
    raw = read_regular(path, "the checkpoint", max_bytes=_CHECKPOINT_MAX_BYTES, error=ConfigError)
    if len(raw) < 8 or struct.unpack("<Q", raw[:8])[0] > len(raw) - 8:
        raise foreign("not a safetensors file")
    header = loads_json(raw[8:8 + struct.unpack("<Q", raw[:8])[0]], str(path), error=ConfigError)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    other = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(other, str) and other != _CHECKPOINT_FORMAT and other.startswith(_CHECKPOINT_FORMAT.split("/")[0]):
        raise ConfigError(f"{path}: an adapt checkpoint of another format ({other[:40]!r}; this tiesmerge reads "
                          f"{_CHECKPOINT_FORMAT!r}): written by another tiesmerge version, so this one cannot resume "
                          "it", hint="resume it with the tiesmerge version that wrote it, or name another checkpoint "
                                     "to start afresh")  # (hp58 c44: "its fields are missing")
    if not isinstance(meta, dict) or meta.get("format") != _CHECKPOINT_FORMAT:
        raise foreign("its fields are missing: no tiesmerge adapt metadata")
    try:
        tensors = load_tensors(raw)
        # a step that is no whole count ("3.5", 10**20: hp77b c13, and hp54 c25: 10**400 overflowed later, "a bug")
        # is this run's checkpoint damaged, said by _check_resumable, not "not a checkpoint tiesmerge adapt wrote"
        written = str(meta["step"])
        step: int | str = int(written) if re.fullmatch(r"-?[0-9]{1,16}", written) else written[:40]
        state = {"fingerprint": meta["fingerprint"], "step": step,
                 "entropy": json.loads(meta["entropy"]), "config": json.loads(meta["config"]),
                 "coefficients": tensors["coefficients"]}
        groups = json.loads(meta["adam_param_groups"])
        # on the CPU: lam.copy_ and Adam's load_state_dict move each to where it belongs (step stays)
        moments = {k: tensors[f"adam.{k}"] for k in _ADAM_TENSORS if f"adam.{k}" in tensors}
    # past the format field the file is an adapt checkpoint: what fails now is damage to it, said as such, not as
    # "not a checkpoint tiesmerge adapt wrote" with Python's words (hp79b c36: KeyError: 'coefficients')
    except RecursionError:  # (hp61b: "RecursionError: maximum ...")
        raise damaged("a field holds JSON nested too deep to read") from None
    except KeyError as exc:
        raise damaged(f"it lacks its {exc.args[0]!r} " + ("tensor" if exc.args[0] in ("coefficients", *(
            f"adam.{k}" for k in _ADAM_TENSORS)) else "field")) from None
    except json.JSONDecodeError as exc:
        raise damaged(f"a field is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise damaged(f"its fields do not read: {str(exc).splitlines()[0][:160] if str(exc) else 'unreadable'}") \
            from None
    except Exception as exc:  # safetensors' own error type for a malformed header or body
        raise damaged(f"its tensors do not read: {str(exc).splitlines()[0][:160] if str(exc) else 'unreadable'}") \
            from None
    state["optimizer"] = {"state": {0: moments} if moments else {}, "param_groups": groups}
    return state


def _check_resumable(state: dict, shape: tuple[int, ...], n_tasks: int, path: Path,
                     betas: tuple[float, float]) -> None:
    """A checkpoint of this run whose contents were damaged or edited (its fingerprint is only the
    run's settings) is refused before it is used: shapes, a step within the run, finite values."""
    def damaged(why: str) -> ConfigError:
        return ConfigError(f"{path}: the checkpoint is damaged ({why})",
                           hint="remove it to start afresh (the run's settings match, its contents do not)")

    moments = state["optimizer"]["state"].get(0, {})
    for name, tensor in [("coefficients", state["coefficients"]), *((f"adam.{k}", moments[k]) for k in
                                                                   ("exp_avg", "exp_avg_sq") if k in moments)]:
        if tuple(tensor.shape) != shape:
            raise damaged(f"{name} is {tuple(tensor.shape)}, the run's coefficients are {shape}")
        if tensor.dtype != torch.float32:  # an integer table would resume from truncated coefficients
            raise damaged(f"{name} is {str(tensor.dtype).removeprefix('torch.')}, not float32")
        if not bool(torch.isfinite(tensor).all()):
            raise damaged(f"{name} holds values that are not finite")
    if "exp_avg_sq" in moments and bool((moments["exp_avg_sq"] < 0).any()):
        raise damaged("adam.exp_avg_sq holds negative values (a mean of squares cannot be)")
    if "exp_avg" in moments and "exp_avg_sq" in moments:
        _check_moments_agree(moments["exp_avg"], moments["exp_avg_sq"], betas, damaged)
    for group in state["optimizer"]["param_groups"] if isinstance(state["optimizer"]["param_groups"], list) else [None]:
        if not isinstance(group, dict):
            raise damaged("the optimizer's settings (adam_param_groups) are not a list of settings")
        # the first setting out of range is named (hp62b a11: a weight_decay of 1e300 was worded as the lr)
        for key, value in group.items():
            numbers = [v for v in (value if isinstance(value, (list, tuple)) else [value])
                       if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if key != "params" and not all(_finite(x) and abs(x) <= FLOAT32_MAX for x in numbers):
                raise damaged(f"the optimizer's setting {_bounded(key)} (adam_param_groups) is {_bounded(value)}, "
                              "beyond float32's range")
        if not (isinstance(group.get("lr"), (int, float)) and not isinstance(group.get("lr"), bool)
                and group["lr"] > 0):
            raise damaged(f"the optimizer's lr (adam_param_groups) is {_bounded(group.get('lr'))}, not a positive "
                          "number")
    step = state["step"]
    entropy = state["entropy"]
    if not isinstance(step, int) or step >= 1 << 53:  # a count past any run too
        raise damaged(f"step {step!r} is no count of steps")
    if step < 0:  # past the run's steps is fine: nothing is left to learn
        raise damaged(f"step {step} is negative")
    # Adam's state is its step count and both moments, all three once it has taken a step: a part of them failed in
    # torch's own step (a KeyError, "a bug"), and none of them restarted Adam silently beside the learned table
    kept = [k for k in _ADAM_TENSORS if k in moments]
    if (step > 0 or kept) and len(kept) != len(_ADAM_TENSORS):
        lacking = [f"adam.{k}" for k in _ADAM_TENSORS if k not in moments]
        raise damaged(f"it lacks {', '.join(lacking)} of the optimizer's state (Adam's step count and two moments, "
                      f"which a checkpoint of step {step} holds)")
    if "step" in moments:  # Adam's own count: its bias corrections divide by 1 - beta ** step (step 0: by zero)
        count = moments["step"]
        if isinstance(count, torch.Tensor) and count.dtype not in (torch.float32, torch.float64):
            # torch keeps it a float tensor: an int8 count wraps past 127 (bias corrections of a negative step are
            # complex), a uint8 one to 0 past 255 (a division by zero), a complex one cannot be cast back (hp59b c17)
            raise damaged(f"adam.step is {str(count.dtype).removeprefix('torch.')}, not float32 (torch's own step "
                          "count)")
        value = float(count) if isinstance(count, (int, float)) and not isinstance(count, bool) or (
            isinstance(count, torch.Tensor) and count.numel() == 1) else None
        if value != step:  # NaN, negative, fractional or another count than the checkpoint's: one optimizer step a step
            raise damaged(f"adam.step is {count.tolist() if isinstance(count, torch.Tensor) else count!r}, where the "
                          f"checkpoint's step is {step} (Adam takes one step per step)")
    # Adam moves a coefficient by about lr a step (lr <= MAX_LR) from an init within MAX_INIT: far past that, the
    # table was edited, and resuming it would fail later as logits that are not finite, blamed on --lr
    reach = MAX_INIT + 10 * MAX_LR * max(step, 1)
    largest = float(state["coefficients"].abs().max()) if state["coefficients"].numel() else 0.0
    if largest > reach:
        raise damaged(f"coefficients reach {largest:.3g}, past what a run reaches in {step} steps (|--init| <= "
                      f"{MAX_INIT:g}, Adam moves a coefficient by about lr <= {MAX_LR:g} a step)")
    if not (isinstance(entropy, list) and len(entropy) == step
            and all(isinstance(r, list) and len(r) == n_tasks and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and _finite(x) and 0 <= x <= MAX_OBJECTIVE
                for x in r) for r in entropy)):
        # an entropy is within [0, ln classes], a cross-entropy of float32 logits far below the bound: 1.7e308 each
        # overflowed their mean to inf, written as Infinity (no JSON) or failing the report's axis (hp60b c10, c13)
        raise damaged(f"its entropy history is not {step} rows of {n_tasks} numbers from 0 to {MAX_OBJECTIVE:g} "
                      "(an entropy or cross-entropy)")


def _check_moments_agree(first: torch.Tensor, second: torch.Tensor, betas: tuple[float, float],
                         damaged: Callable[[str], ConfigError]) -> None:
    """Adam's moments are running means of one gradient stream: m = sum_i a_i g_i, v = sum_i b_i g_i^2 with
    a_i = (1 - beta1) beta1^k, b_i = (1 - beta2) beta2^k. By Cauchy-Schwarz m^2 <= v * sum_i a_i^2 / b_i <=
    v * (1 - beta1)^2 / ((1 - beta2) (1 - beta1^2 / beta2)) (about 53 v with the defaults). A first moment past
    that was edited: resumed, it moved the coefficients to logits that are not finite, blamed on --lr (hp58b c45)."""
    beta1, beta2 = betas
    if not (0 <= beta1 < 1 and 0 < beta2 < 1 and beta1 * beta1 < beta2):  # no such bound (a run's own betas)
        return
    ratio = (1 - beta1) ** 2 / ((1 - beta2) * (1 - beta1 * beta1 / beta2))
    # float32 rounding of both moments: a relative slack, and an absolute one for moments near zero
    allowed = (second.double() * ratio).sqrt() * 1.001 + 1e-30  # (shape of the coefficients)
    worst = first.double().abs() - allowed
    if bool((worst > 0).any()):
        k = int(worst.argmax())
        raise damaged(f"adam.exp_avg holds {float(first.flatten()[k]):.3g} where adam.exp_avg_sq holds "
                      f"{float(second.flatten()[k]):.3g}: Adam's first moment is at most "
                      f"{math.sqrt(ratio):.3g} x the square root of its second")


_finite = finite_float  # an int of 401 digits is no finite number (hp54 c26, c27: math.isfinite overflowed)


def _check_optimizer_settings(saved: Any, current: list[dict], path: Path) -> None:
    """Adam's settings in the checkpoint must be this run's (its fingerprint already holds lr and the rest): an
    edited group (lr 1e30, betas (1, 1), amsgrad, maximize, capturable) would otherwise be loaded over the run's own
    and fail far from its cause, or silently learn something else."""
    def settings(groups: Any) -> list[dict] | None:
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            return None
        return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"} for g in groups]

    mine, theirs = settings(current), settings(saved)
    if theirs is not None and len(theirs) == len(mine):
        # the settings both name must agree; one only another torch version has (foreach, decoupled_weight_decay)
        # is left out, the run's own groups being the ones loaded
        differ = [k for k in sorted(set(mine[0]) & set(theirs[0])) if mine[0][k] != theirs[0][k]]
        if not differ:
            return
        why = f"{differ[0]} is {theirs[0][differ[0]]!r} there, {mine[0][differ[0]]!r} in this run"
    else:
        why = "they are not one group of Adam's settings"
    raise ConfigError(f"{path}: the checkpoint is damaged (its optimizer settings are not this run's: {why})",
                      hint="remove it to start afresh (the run's settings match, its contents do not)")


def is_checkpoint(path: Path) -> bool:
    """``path`` is a checkpoint tiesmerge adapt wrote (its header says so), which a run may replace."""
    try:
        load_checkpoint(path)
    except ConfigError:
        return False
    return True


def _folder_identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder ``folder`` names now (links followed), None where there is none."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime in ns) of ``path``, not following a link; None where there is nothing."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _save(path: Path, state: dict) -> None:
    from safetensors.torch import save_file

    optimizer = state["optimizer"]
    moments = optimizer["state"].get(0, {})
    tensors = {"coefficients": state["coefficients"].contiguous(),
               **{f"adam.{k}": torch.as_tensor(moments[k]).detach().cpu().contiguous()
                  for k in _ADAM_TENSORS if k in moments}}
    meta = {"format": _CHECKPOINT_FORMAT, "fingerprint": state["fingerprint"], "step": str(state["step"]),
            "entropy": json.dumps(state["entropy"]), "config": json.dumps(state["config"]),
            "adam_param_groups": json.dumps(optimizer["param_groups"])}
    from ..io.writer import remove_stale
    from ..scratch import host_tag

    remove_stale(path.parent)  # a checkpoint staged by a run killed outright (SIGKILL)
    # named for the host and process, not the checkpoint: any legal name of it works, and a dead run's is found
    tmp = path.with_name(f".tiesmerge-file-{host_tag()}-{os.getpid()}-checkpoint")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        as_if_created(tmp)  # the umask's mode, as the output's files have
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":  # safetensors' own I/O errors
            from ..paths import write_error

            raise write_error(path, exc if isinstance(exc, OSError) else OSError(str(exc))) from None
        raise


def learn(forward: TaskForward, merger: Merger, data: Mapping[str, Sequence[Any]], config: AdaptConfig, *,
          checkpoint: str | os.PathLike | None = None, resume: bool = False, fingerprint: str = "",
          progress: bool = False, on_step: Callable[[int, list[float]], None] | None = None,
          sources: Mapping[str, str] | None = None) -> tuple[torch.Tensor, History, dict[str, float]]:
    """Learn the (T, L) coefficients; return them (on the CPU), the entropy history and seconds.

    ``data``: task -> its unlabeled rows, in the models' order. ``checkpoint``: a file written
    every ``config.checkpoint_every`` steps and at the end; with ``resume`` an existing one (of the
    same ``fingerprint``) is continued from its step, drawing the same batches as an unbroken run. ``sources``: the
    data file of each task (task -> path), named in the labels' errors."""
    problems = config.problems()
    if problems:
        raise ConfigError(problems)
    tasks = list(data)
    if len(tasks) != merger.n_tasks:
        raise ConfigError(f"{len(tasks)} task(s) of data for {merger.n_tasks} model(s)",
                          hint="give one data file per model, in the models' order")
    for task, rows in data.items():
        if not rows:
            raise ConfigError(f"task {task!r}: no examples")
    if config.objective == "cross_entropy":
        check_labels(data)
    merger.unused = check_forward_names(forward, merger.names)
    device = next(iter(merger.vectors.values())).device
    lam = torch.full(merger.shape, float(config.init), dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([lam], lr=config.lr)
    history = History(tasks)
    start = 0
    path = Path(checkpoint) if checkpoint is not None else None
    if resume and path is not None and path.is_file():
        state = load_checkpoint(path)
        _fingerprint_check(state.get("fingerprint", ""), fingerprint, path, state.get("config"), config)
        _check_resumable(state, tuple(lam.shape), len(tasks), path, tuple(optimizer.param_groups[0]["betas"]))
        _check_optimizer_settings(state["optimizer"]["param_groups"], optimizer.state_dict()["param_groups"], path)
        state["optimizer"]["param_groups"] = optimizer.state_dict()["param_groups"]  # the run's: equal where named
        try:
            with torch.no_grad():
                lam.copy_(state["coefficients"])
            optimizer.load_state_dict(state["optimizer"])
            history.entropy = [list(map(float, row)) for row in state["entropy"]]
            start = int(state["step"])
            if start > config.steps:  # steps are left out of the fingerprint (a run may be extended), not shortened
                warnings.warn(MergeWarning(f"{path}: the checkpoint is at step {start}, past --steps {config.steps}: "
                                           f"the result is the {start}-step one (for {config.steps} steps, start "
                                           "afresh: remove the checkpoint, or name another --checkpoint)"),
                              stacklevel=3)  # (hp66b c46: "without --resume" was refused as "already exists")
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{path}: not a checkpoint tiesmerge adapt wrote for this run "
                              f"({type(exc).__name__}: {str(exc)[:200]})",
                              hint="remove it to start afresh, or name the right --checkpoint") from None
    every = config.checkpoint_every or max(1, math.ceil(max(len(r) for r in data.values()) / config.batch_size))
    seconds = {"steps": 0.0, "checkpoints": 0.0}

    written = [_file_stamp(path) if path is not None else None]  # the checkpoint as this run last left it
    folder = _folder_identity(path.parent) if path is not None else None  # where it was checked to be written

    def save(step: int) -> None:
        if path is None:
            return
        clock = time.perf_counter()
        if _folder_identity(path.parent) != folder:  # (hp46 c06: its folder replaced by a link into model 1: the
            from ..errors import OutputError  # checkpoint was written among the model's files)

            raise OutputError(f"{path.parent}: the checkpoint's folder was replaced (moved, or made a link) while "
                              "the run went on; nothing is written there, since it may now be another folder (an "
                              "input's)", hint="give the checkpoint a folder that stays (--checkpoint), and run "
                                               "again")
        if _file_stamp(path) != written[0]:  # another run writes it too (hp45 c66: two runs on one -o, each
            from ..errors import OutputError  # replacing the other's checkpoint, the survivor's --resume refused)

            raise OutputError(f"{path}: the checkpoint was replaced by another process since this run wrote it "
                              "(another adapt run with the same output or --checkpoint?)",
                              hint="let one run use it: give each run its own -o (or --checkpoint); this run "
                                   "stops here, before its merge")
        _save(path, {"fingerprint": fingerprint, "step": step, "coefficients": lam.detach().cpu(),
                     "optimizer": optimizer.state_dict(), "entropy": history.entropy, "config": asdict(config)})
        written[0] = _file_stamp(path)
        seconds["checkpoints"] += time.perf_counter() - clock

    if config.objective == "cross_entropy":  # every label against its task's classes, before the first step
        with torch.no_grad():
            params = merger.params(lam)
            for task in tasks:
                where = (sources or {}).get(task) or f"task {task!r}"
                for k, row in enumerate(data[task]):  # a row's own choices bound its label (hp45 c78: an IndexError
                    own = row.get("choices") if isinstance(row, Mapping) else None  # in the first step)
                    if isinstance(own, list) and int(row["label"]) >= len(own):
                        raise ConfigError(f"{where}: example {k + 1}'s label {row['label']} is past its own "
                                          f"{len(own)} choices (0 .. {len(own) - 1})",
                                          hint="labels are indices into the row's choices, from 0")
                classes = logits(forward, forward.encode(list(data[task][:1]), task), task, params).shape[-1]
                past = [(k, int(row["label"])) for k, row in enumerate(data[task]) if int(row["label"]) >= classes]
                if past:  # the first such example named, as the data files' other checks name theirs (hp68b c30)
                    k, label = past[0]
                    raise ConfigError(f"{where}: example {k + 1}'s label {label} is past the model's {classes} "
                                      f"classes for this task (0 .. {classes - 1})"
                                      + (f"; {len(past) - 1} more example(s) likewise" if len(past) > 1 else ""),
                                      hint="labels are class indices from 0")
    bar = None
    if progress and config.steps > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=f"adamerging ({config.granularity}-wise)",
                   dynamic_ncols=True)
    was_training = forward.training  # type: ignore[attr-defined]
    forward.eval()  # type: ignore[attr-defined]  # dropout off: the entropy of the model that will be written
    started_at = lam.detach().clone()  # (T, ...) the coefficients this run starts from
    stuck_said = False
    try:
        for step in range(start, config.steps):
            clock = time.perf_counter()
            params = merger.params(lam)  # (graph) lam -> theta
            # each task's backward stops at theta (leaves), its gradients summed there; one backward from
            # theta to lam per step (it costs a pass over the T vectors: per task it would cost T of them)
            leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
            row = []
            for t, task in enumerate(tasks):
                rows = batch_rows(data[task], step, config.batch_size, config.seed, t)
                out = logits(forward, forward.encode(rows, task), task, leaves)  # (B, classes)
                h = objective(out, rows, config.objective)
                if not torch.isfinite(h):
                    # float(h.detach()): a tensor that requires grad printed torch's own UserWarning first (hp38 C74);
                    # at step 0 no step was taken yet: the start (--init) or the forward is the cause, not --lr
                    cause = ("lower --lr, or --clamp the coefficients" if step else
                             "no step was taken yet: a smaller --init (float16 or bfloat16 models overflow sooner)")
                    raise TrainingError(f"the {config.objective} of task {task!r} at step {step} is "
                                        f"{float(h.detach())}: the merged model's logits are not finite",
                                        hint=f"{cause}; check the task's inputs and the forward")
                h.backward()  # one task's activations at a time
                row.append(float(h.detach()))
            used = [n for n in leaves if leaves[n].grad is not None]  # not merger.names: those the forward
            # never reads (a BertModel's pooler under the encoder forward, merger.unused) are no leaves (hp34 D47)
            torch.autograd.backward([params[n] for n in used], [leaves[n].grad for n in used])
            if step == start and lam.grad is not None and not bool(lam.grad.any()):
                _warn_stuck(row, config, merger)
                stuck_said = True
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if config.clamp is not None:
                with torch.no_grad():
                    lam.clamp_(*config.clamp)
            history.entropy.append(row)
            seconds["steps"] += time.perf_counter() - clock
            if on_step is not None:
                on_step(step, row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(entropy=f"{sum(row) / len(row):.4f}")
            if (step + 1) % every == 0 and step + 1 < config.steps:
                save(step + 1)
        if config.steps > start or (path is not None and not path.is_file()):
            save(max(config.steps, start))
        if config.steps > start and not stuck_said and torch.equal(lam.detach(), started_at):
            _warn_unmoved(config.steps - start, history.entropy[start:], config, started_at)
    finally:
        if bar is not None:
            bar.close()
        forward.train(was_training)  # type: ignore[attr-defined]
    return lam.detach().cpu(), history, seconds
