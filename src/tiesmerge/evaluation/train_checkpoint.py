"""The training state :func:`tiesmerge.evaluation.finetune.finetune` saves and resumes from: where it may
be written, which run it belongs to, and reading and writing it without leaving a half-written file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from ..errors import ConfigError, OutputError

__all__ = ["check_checkpoint_path", "remove_dead_partials", "run_fingerprint", "load_training_state",
           "check_training_state", "save_training_state"]

# what a state holds; a file lacking one is no checkpoint of finetune's
_KEYS = ("fingerprint", "encoder", "optimizer", "schedule", "rng", "step", "loss_value", "seen", "epoch",
         "done", "losses", "epoch_seconds", "curve", "best_epoch", "best_score", "stale", "best_state", "seconds")


def check_checkpoint_path(checkpoint: str | os.PathLike, seconds: float) -> str:
    """``checkpoint`` as a path, checked before any training (hp64b c05, c11, c12: a FIFO blocked torch.load, a
    missing folder or an empty name failed only at the first save, an epoch's work lost): a non-empty name, in a
    folder that exists, naming nothing or a regular file. ``seconds``: a finite number >= 0 (NaN never saved)."""
    path = os.fspath(checkpoint)
    if not isinstance(path, str) or not path or path.endswith(("/", os.sep)):  # "ck.pt/" names a folder (hp65b c21)
        raise ConfigError(f"checkpoint={checkpoint!r} is not the path of a file", hint="name a file, e.g. train.pt")
    try:  # 10**400: math.isfinite's OverflowError (hp66b c38)
        finite = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
    except OverflowError:
        finite = False
    if not finite or seconds < 0:
        raise ConfigError(f"checkpoint_seconds={seconds!r} is not a number of seconds (a finite number >= 0)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{path}: the checkpoint's folder {folder} does not exist", hint="create it first")
    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    staged = f"{os.path.basename(path)}.{4 * 10**6}.partial"  # the save's staged name, with the longest pid
    if len(os.fsencode(staged)) > longest:  # (hp65b c01: refused at the first save, after training)
        raise ConfigError(f"{path}: the checkpoint's name is too long: saving stages it as {staged[:40]}..., "
                          f"{len(os.fsencode(staged))} bytes, past the file system's {longest}",
                          hint="name the checkpoint in fewer characters")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path}: the checkpoint is not a regular file (a folder, a FIFO or a device)",
                          hint="name a file that training may write and read back")
    return path


def remove_dead_partials(path: str) -> None:
    """A save killed between its write and its rename leaves ``<checkpoint>.<pid>.partial``: one of a process of
    this machine that is gone is removed by the next run (hp64b c26: each killed save left one for good)."""
    from ..scratch import process_is_dead

    folder, name = os.path.split(os.path.abspath(path))
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        pid = entry[len(name) + 1:-len(".partial")] if entry.startswith(name + ".") and entry.endswith(".partial") \
            else ""
        full = os.path.join(folder, entry)
        if pid.isdigit() and process_is_dead(pid) and os.path.isfile(full) and not os.path.islink(full) \
                and _torch_archive_or_empty(full):  # a file of the user's so named stays (hp66b c42)
            try:
                os.unlink(full)
            except OSError:
                pass


def _torch_archive_or_empty(path: str) -> bool:
    """Whether ``path`` is what torch.save begins (a zip archive) or nothing yet: a save's own staged file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"", b"PK\x03\x04")


def run_fingerprint(config: Any, examples: Mapping[str, Sequence[tuple[str, int]]], classes: Mapping[str, int], *,
                    shapes: Mapping[str, tuple[int, ...]], validated: bool,
                    tensors: Sequence[torch.Tensor] = ()) -> str:
    """sha256 of what decides a training run: its settings, every example (text and label, in order), each task's
    number of classes, the encoder's parameter shapes, whether epochs are validated (the best epoch kept, or the
    last), and ``tensors`` (the starting weights, the heads). A checkpoint of another run is refused by it (hp64b
    c03, c14, c43: only the step count and the seed were compared: a run on other data, another encoder, or without
    validation resumed from another's state)."""
    digest = hashlib.sha256(json.dumps([asdict(config), sorted((k, list(v)) for k, v in shapes.items()), validated],
                                       sort_keys=True, default=str).encode())
    for tensor in tensors:  # the starting weights and the heads' values (hp65b c05: another encoder of the same
        # shapes, or heads of other class descriptions, resumed another run)
        digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for task in examples:  # in the order given: the batches follow it (hp67b c33: sorted, another order resumed)
        digest.update(json.dumps([task, classes.get(task), [[t, y] for t, y in examples[task]]],
                                 ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def load_training_state(path: str, fingerprint: str) -> dict[str, Any]:
    """The state saved at ``path`` (read with ``weights_only``: no code runs), refused unless it is one of this
    run's (hp64b c01: a text file was a bare KeyError of torch's pickle reader)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle's and torch's own errors: the file is not a checkpoint of finetune's
        raise ConfigError(f"{path}: not a training checkpoint ({type(exc).__name__}: {str(exc)[:160]})",
                          hint="name another checkpoint file (this one is left as it is: it may be yours, or a "
                               "model's weights)") from None
    if not isinstance(state, dict) or any(k not in state for k in _KEYS):
        raise ConfigError(f"{path}: not a training checkpoint of this version (its fields are missing)",
                          hint="name another checkpoint file (this one is left as it is: it may be yours, or a "
                               "model's weights); an old training checkpoint of yours may be removed")  # (hp67b c24)
    if state["fingerprint"] != fingerprint:
        raise ConfigError(f"{path}: a training checkpoint of another run (its settings, examples or heads differ "
                          "from this run's)", hint="remove it, or resume with the run that wrote it")
    return state


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _check_like(value: Any, fresh: Any, what: str, damaged: Any, depth: int = 0) -> None:
    """``value`` shaped as ``fresh`` (a new optimizer's or schedule's state_dict): the same keys, the same types of
    leaves (a number where a number is, finite; a tensor where a tensor is, of its shape): an edited "lr" of "x" or a
    schedule "step" of 1 failed at the first step, inside torch (hp66b c06-c08)."""
    if depth > 8:
        raise damaged(f"{what} is nested too deep")
    if isinstance(fresh, dict):
        if not isinstance(value, dict):
            raise damaged(f"{what} is not a mapping")
        if fresh and "state" in fresh and "param_groups" in fresh:  # an optimizer: its per-parameter state is
            # empty before the first step, so only its groups are shaped like a fresh one's
            _check_like(value.get("param_groups"), fresh["param_groups"], what, damaged, depth + 1)
            if not isinstance(value.get("state"), dict):
                raise damaged(f"{what} has no per-parameter state")
            return
        if set(value) != set(fresh):
            raise damaged(f"{what} has other fields than this run's ({sorted(map(str, set(value) ^ set(fresh)))[:3]}; "
                          "written by another torch version?)")
        for key in fresh:
            _check_like(value[key], fresh[key], f"{what}'s {key}", damaged, depth + 1)
        return
    if isinstance(fresh, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(fresh):
            raise damaged(f"{what} is not a list of {len(fresh)}")
        for v, f in zip(value, fresh):
            _check_like(v, f, what, damaged, depth + 1)
        return
    if isinstance(fresh, bool):  # (before the numbers: a bool is an int)
        if not isinstance(value, bool):
            raise damaged(f"{what} holds {str(value)[:40]!r} where a true or false goes")
        return
    if fresh is None:  # a setting left unset (AdamW's foreach, fused): a plain value, if any
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise damaged(f"{what} holds {type(value).__name__}")
        return
    if isinstance(fresh, (int, float)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            finite = number and math.isfinite(value)
        except OverflowError:
            finite = False
        if not finite or (isinstance(fresh, int) and not isinstance(value, int)):
            raise damaged(f"{what} holds {str(value)[:40]!r} where a {type(fresh).__name__} goes")
        return
    if isinstance(fresh, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != fresh.shape:
            raise damaged(f"{what} holds no tensor of shape {tuple(fresh.shape)}")
        return
    if callable(fresh) or type(value) is not type(fresh):  # (a schedule's own callables are not in its state)
        raise damaged(f"{what} holds {type(value).__name__} where a {type(fresh).__name__} goes")


def check_training_state(state: dict[str, Any], path: str, *, epochs: Sequence[int], expected: Mapping[str, Any],
                         fresh: Mapping[str, Any], validated: bool = False, max_batch: int = 1 << 30) -> None:
    """Every field of a loaded state of the right type and within the run, before any is applied (hp65b c02-c04: a
    field edited with the fingerprint kept was a bare TypeError, KeyError or RuntimeError, an epoch of '1' or a
    done of 10**30 resumed the wrong steps silently, NaN weights trained on). ``epochs``: the batches of each
    epoch; ``expected``: the encoder's state dict (names and shapes); ``fresh``: this run's new optimizer's and
    schedule's state dicts, which the saved ones must be shaped like."""
    def damaged(why: str) -> ConfigError:
        return ConfigError(f"{path}: the training checkpoint is damaged ({why})",
                           hint="remove it (or name another checkpoint) to train from the start")

    def whole(value: Any, low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    def real(value: Any, allow_none: bool = False) -> bool:  # finite: a NaN score never loses, nor a NaN loss
        # shows (hp66b c01-c04: 10**400 an OverflowError, NaN let through)
        if value is None:
            return allow_none
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        try:
            return math.isfinite(value)
        except OverflowError:
            return False

    total = sum(epochs)
    if not whole(state["epoch"], 1, len(epochs)):
        raise damaged(f"epoch {str(state['epoch'])[:40]!r} is not one of the run's {len(epochs)}")
    if not whole(state["done"], 0, epochs[state["epoch"] - 1] - 1):
        raise damaged(f"done {str(state['done'])[:40]!r} is not a batch of epoch {state['epoch']}")
    for key, high in (("step", total), ("seen", 1 << 62), ("stale", len(epochs))):
        if not whole(state[key], 0, high):
            raise damaged(f"{key} {str(state[key])[:40]!r} is out of the run's range")
    for key in ("seconds", "epoch_seconds"):
        if not real(state[key]) or state[key] < 0 or state[key] != state[key]:
            raise damaged(f"{key} {str(state[key])[:40]!r} is not a number of seconds")
    if not real(state["loss_value"]):
        raise damaged("loss_value is not a number")
    losses, curve = state["losses"], state["curve"]
    if not isinstance(losses, list) or not all(real(x) for x in losses):
        raise damaged("losses is not a list of numbers")
    if not isinstance(curve, list) or len(curve) != state["epoch"] - 1 or not all(
            isinstance(r, (list, tuple)) and len(r) == 4 and r[0] == k and real(r[1])
            and real(r[2], allow_none=True) and real(r[3]) for k, r in enumerate(curve, 1)):
        raise damaged("curve is not one (epoch, loss, validation, seconds) row per finished epoch, in order")
    if state["step"] != sum(epochs[:state["epoch"] - 1]) + state["done"] or len(losses) != state["done"]:
        raise damaged(f"step {state['step']} is not the batches of the epochs before it and the {state['done']} of "
                      "this one")  # (hp66b c23: a log of 2 steps and epoch 2 twice)
    if not (state["best_epoch"] is None or whole(state["best_epoch"], 1, len(curve))) or not real(
            state["best_score"], allow_none=True):
        raise damaged("best_epoch or best_score is out of the run's range")
    if len({state["best_epoch"] is None, state["best_score"] is None, state["best_state"] is None}) != 1:
        raise damaged("best_epoch, best_score and best_state do not go together")  # (hp66b c05: log and weights
        # disagreed)
    scores = [r[2] for r in curve]
    if any(isinstance(r[0], bool) for r in curve) or (validated and any(v is None for v in scores)) or (
            not validated and any(v is not None for v in scores)):  # (hp67b c07, c08)
        raise damaged("curve's rows do not match this run (its epochs, or its validation scores)")
    best = max(range(len(scores)), key=lambda i: scores[i], default=None) if validated and scores else None
    if validated and scores and (state["best_epoch"] is None or state["best_score"] != scores[state["best_epoch"] - 1]
                                 or state["best_score"] != scores[best]):  # (hp67b c04-c06: another epoch kept)
        raise damaged("best_epoch and best_score are not the curve's best validation score")
    if state["seen"] > state["step"] * max_batch:  # (hp67b c03: examples 10**15)
        raise damaged(f"seen {state['seen']} is more examples than {state['step']} steps hold")
    for key in ("encoder", "best_state"):
        weights = state[key]
        if key == "best_state" and weights is None:
            continue
        if not isinstance(weights, dict) or set(weights) != set(expected) or any(
                not isinstance(weights[k], torch.Tensor) or tuple(weights[k].shape) != tuple(expected[k].shape)
                for k in expected):
            raise damaged(f"{key} does not hold the encoder's tensors and shapes")
        bad = next((k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())),
                   None)
        if bad is not None:
            raise damaged(f"{key}'s {bad!r} holds values that are not finite")
    if not isinstance(state["rng"], torch.Tensor) or state["rng"].dtype != torch.uint8 or \
            state["rng"].shape != torch.get_rng_state().shape:
        raise damaged("rng is not torch's random state")
    # the CUDA generator's state, saved where the encoder trains on CUDA (absent from a CPU run's checkpoint)
    cuda_rng = state.get("cuda_rng")
    if cuda_rng is not None and (not isinstance(cuda_rng, torch.Tensor) or cuda_rng.dtype != torch.uint8
                                 or cuda_rng.dim() != 1):
        raise damaged("cuda_rng is not a CUDA generator's random state")
    _check_like(state["optimizer"], fresh["optimizer"], "the optimizer's state", damaged)
    _check_like(state["schedule"], fresh["schedule"], "the schedule's state", damaged)
    for tensor in _tensors(state["optimizer"].get("state")):  # AdamW's moments (hp66b c10: NaN trained on)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise damaged("the optimizer's state holds values that are not finite")


def save_training_state(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` beside ``path``, then rename it into place: a kill while saving leaves the last whole
    checkpoint, and a failed write (a full disk: hp64b c04) leaves nothing of its own and is said as such."""
    partial = f"{path}.{os.getpid()}.partial"  # workers training the same model write their own
    try:
        torch.save(state, partial)
        os.replace(partial, path)
    except (OSError, RuntimeError) as exc:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise OutputError(f"{path}: cannot save the training checkpoint ({str(exc).splitlines()[0][:160]})",
                          hint="free some space or name another checkpoint; the training so far is lost only "
                               "since the last checkpoint") from None
