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

__all__ = ["check_checkpoint_path", "run_fingerprint", "load_training_state", "save_training_state"]

# what a state holds; a file lacking one is no checkpoint of finetune's
_KEYS = ("fingerprint", "total", "encoder", "optimizer", "schedule", "rng", "step", "loss_value", "seen", "epoch",
         "done", "losses", "epoch_seconds", "curve", "best_epoch", "best_score", "stale", "best_state", "seconds")


def check_checkpoint_path(checkpoint: str | os.PathLike, seconds: float) -> str:
    """``checkpoint`` as a path, checked before any training (hp64b c05, c11, c12: a FIFO blocked torch.load, a
    missing folder or an empty name failed only at the first save, an epoch's work lost): a non-empty name, in a
    folder that exists, naming nothing or a regular file. ``seconds``: a finite number >= 0 (NaN never saved)."""
    path = os.fspath(checkpoint)
    if not isinstance(path, str) or not path:
        raise ConfigError(f"checkpoint={checkpoint!r} is not the path of a file", hint="name a file, e.g. train.pt")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"checkpoint_seconds={seconds!r} is not a number of seconds (a finite number >= 0)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{path}: the checkpoint's folder {folder} does not exist", hint="create it first")
    _remove_dead_partials(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path}: the checkpoint is not a regular file (a folder, a FIFO or a device)",
                          hint="name a file that training may write and read back")
    return path


def _remove_dead_partials(path: str) -> None:
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
        if pid.isdigit() and process_is_dead(pid) and os.path.isfile(os.path.join(folder, entry)):
            try:
                os.unlink(os.path.join(folder, entry))
            except OSError:
                pass


def run_fingerprint(config: Any, examples: Mapping[str, Sequence[tuple[str, int]]], classes: Mapping[str, int], *,
                    shapes: Mapping[str, tuple[int, ...]], validated: bool) -> str:
    """sha256 of what decides a training run: its settings, every example (text and label, in order), each task's
    number of classes, the encoder's parameter shapes, and whether epochs are validated (the best epoch kept, or the
    last). A checkpoint of another run is refused by it (hp64b c03, c14, c43: only the step count and the seed were
    compared: a run on other data, another encoder, or without validation resumed from another's state)."""
    digest = hashlib.sha256(json.dumps([asdict(config), sorted((k, list(v)) for k, v in shapes.items()), validated],
                                       sort_keys=True, default=str).encode())
    for task in sorted(examples):
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
                          hint="remove it (or name another checkpoint) to train from the start") from None
    if not isinstance(state, dict) or any(k not in state for k in _KEYS):
        raise ConfigError(f"{path}: not a training checkpoint of this version (its fields are missing)",
                          hint="remove it (or name another checkpoint) to train from the start")
    if state["fingerprint"] != fingerprint:
        raise ConfigError(f"{path}: a training checkpoint of another run (its settings, examples or heads differ "
                          "from this run's)", hint="remove it, or resume with the run that wrote it")
    return state


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
