"""Where candidates are merged and scored: in this process, or as Ray tasks on a cluster.

Both executors take a batch of candidates, merge once per merge key (candidates that differ in
lam only share it), score every candidate with the same functions (:mod:`.candidates`), and
report each score as it arrives. Each keeps the merged task vector of the best candidate so far
(in memory, or in Ray's object store) and drops the others, so only the winner's state is kept.

On Ray a merge is one task and each candidate's evaluation another, that takes the merge's
result (an object in the object store) as its input: evaluations spread over every worker as
soon as their merge is done. Tasks ask for one GPU each where the cluster has GPUs (Ray then
shows each task only its GPU, as ``cuda:0``), and a task whose worker dies is run again
(``max_retries``); an exception raised by the evaluator is not retried (it would fail again).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import ConfigError, EvaluatorError, MergeWarning, TiesMergeError
from ..scratch import private_folder
from .candidates import Candidate, Evaluator, Job, better, candidate_state, merged_delta, score_state
from .evaluator import evaluator_name

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "ray_available"]

OnScored = Callable[[Candidate, float, float], None]  # (candidate, score, seconds of its evaluation)


class Executor(Protocol):
    """start() once per search, score() per batch, delta() for the winner, close() at the end."""

    merges: int

    def start(self, job: Job, evaluate: Evaluator, base32: Mapping[str, torch.Tensor],
              dtypes: Mapping[str, torch.dtype]) -> None: ...

    def score(self, batch: Sequence[Candidate], on_scored: OnScored) -> None: ...

    def delta(self, merge_key: str) -> dict[str, torch.Tensor] | None: ...

    def close(self) -> None: ...


def _groups(batch: Sequence[Candidate]) -> dict[str, list[Candidate]]:
    """Candidates by merge key, in the order each key first appears."""
    groups: dict[str, list[Candidate]] = {}
    for c in batch:
        groups.setdefault(c.merge_key, []).append(c)
    return groups


class LocalExecutor:
    """Every merge and evaluation in this process, one after another (the search without Ray)."""

    def __init__(self) -> None:
        self.merges = 0
        self._best: tuple[float, str, dict[str, torch.Tensor]] | None = None

    def start(self, job: Job, evaluate: Evaluator, base32: Mapping[str, torch.Tensor],
              dtypes: Mapping[str, torch.dtype]) -> None:
        self._job, self._evaluate, self._base32, self._dtypes = job, evaluate, base32, dtypes
        self._best = None

    def score(self, batch: Sequence[Candidate], on_scored: OnScored) -> None:
        for key, group in _groups(batch).items():
            delta = merged_delta(self._job, self._base32, group[0].options)
            self.merges += 1
            for c in group:
                state = candidate_state(self._job, self._base32, delta, c.options, self._dtypes)
                score, seconds = score_state(self._evaluate, state)
                del state
                if better(score, None if self._best is None else self._best[0]):
                    self._best = (score, key, delta)
                on_scored(c, score, seconds)
            del delta  # freed unless it is the best so far

    def delta(self, merge_key: str) -> dict[str, torch.Tensor] | None:
        return self._best[2] if self._best is not None and self._best[1] == merge_key else None

    def close(self) -> None:
        self._best = None


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _import_ray(local: bool = False):
    """``ray``; ``local``: a local cluster will be started, so give it a private token first (see _private_token)."""
    if local and "ray" not in sys.modules:  # Ray reads the token settings when it is imported
        _private_token()
    try:
        import ray
    except ImportError:
        raise ConfigError("running the search on Ray needs ray",
                          hint="pip install 'tiesmerge[distributed]'; without --ray the search runs in one process"
                          ) from None
    return ray


# The object store shares numpy arrays between the workers of a node without copying them (torch
# tensors would be unpickled into a copy per task), so states travel as arrays. Every state here is
# float32 or an integer/bool buffer: dtypes numpy has.
# Ray's longest socket path under its folder: "session_<date>_<time>_<micro>_<pid>/sockets/plasma_store" (the
# driver's pid); a Unix socket's path holds 107 bytes at most, so a longer folder fails inside ray.init in Ray's words
_RAY_SESSION = len("/session_2026-12-06_02-28-38_123456_")
_RAY_SOCKET = len("/sockets/plasma_store")
_SOCKET_PATH_MAX = 107
_RAY_PREFIX = "tiesray-"  # with the host tag, the pid and mkdtemp's 8 characters: 35 bytes for a 7-digit pid


def _ray_folder() -> str:
    """The local cluster's private session folder, short enough for Ray's socket paths (checked up front)."""
    folder = private_folder(_RAY_PREFIX)
    tail = _RAY_SESSION + len(str(os.getpid())) + _RAY_SOCKET
    if len(os.fsencode(folder)) + tail > _SOCKET_PATH_MAX:
        room = _SOCKET_PATH_MAX - tail - (len(os.fsencode(folder)) - len(os.fsencode(os.path.dirname(folder))))
        raise ConfigError(f"{os.path.dirname(folder)}: the temporary folder's path is "
                          f"{len(os.fsencode(os.path.dirname(folder)))} bytes long, and Ray's socket paths in its "
                          f"folder there ({os.path.basename(folder)}) would pass the {_SOCKET_PATH_MAX} bytes a Unix "
                          "socket path holds",
                          hint=f"set TMPDIR to a folder of at most {max(room, 1)} bytes (e.g. /tmp), or RAY_TMPDIR "
                               "to a short folder of your own for Ray")
    return folder


def _private_token() -> None:
    """Ray 2.60 starts a local cluster with token authentication and saves a new token to ~/.ray/auth_token: a file
    written outside the command's output and folders. Where the user has no token or mode of their own, the cluster
    gets a random token through the environment (the workers inherit it) and nothing is written to the home folder.
    Only before Ray is imported: set later, the driver would not present it and the cluster would refuse it."""
    if any(os.environ.get(v) for v in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return  # the user's own choice
    if os.path.exists(os.path.join(os.path.expanduser("~"), ".ray", "auth_token")):
        return  # the user's token: Ray reads it as before
    import secrets

    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ["RAY_AUTH_MODE"] = "token"


def _to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _from_numpy(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # the object store's arrays are read-only; nothing here writes to them
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return {k: torch.from_numpy(v) for k, v in state.items()}


def _threads(count: int) -> None:
    """A task uses the CPUs Ray gave it: one thread per CPU (Ray's worker may hold another setting from
    its previous task, and torch's default is every core of the node, which oversubscribes them). And torch's
    process settings as tiesmerge's merges need them: an evaluator module imported in the worker (as the task's
    evaluator was unpickled) may have turned on the flush of subnormal floats, which the driver's own import puts
    back and says there (hp49 c02: a worker's merges of subnormal deltas were 0, scored otherwise than locally)."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    from .evaluator import restore_torch_defaults

    restore_torch_defaults((torch.device("cpu"), torch.float32, False), "the evaluator's module, in a Ray worker,",
                           "in the worker")  # a no-op where nothing changed them


def _merge_task(threads: int, job: Job, base32: Mapping[str, np.ndarray], options: dict[str, Any], base: Any,
                *models: Any) -> dict[str, np.ndarray]:
    """A Ray task: one merge's float32 task vector tau_m (the base and models as the job names them,
    or as state dicts from the object store)."""
    _threads(threads)
    base = _from_numpy(base) if isinstance(base, Mapping) else base
    models = [_from_numpy(m) if isinstance(m, Mapping) else m for m in models]
    return _to_numpy(merged_delta(job, _from_numpy(base32), options, base=base, models=models))


def _score_task(threads: int, evaluate: Evaluator, job: Job, base32: Mapping[str, np.ndarray],
                delta: Mapping[str, np.ndarray], options: dict[str, Any], dtypes: Mapping[str, torch.dtype]
                ) -> tuple[float, float]:
    """A Ray task: one candidate's (score, seconds)."""
    _threads(threads)
    return score_state(evaluate, candidate_state(job, _from_numpy(base32), _from_numpy(delta), options, dtypes))


class RayExecutor:
    """Merges and evaluations as Ray tasks. ``address``: a cluster to join (``ray start --head``
    prints it; "auto" finds a local one); None starts a local cluster on this machine's CPUs, where
    ``workers`` tasks run at once (default one per CPU), each with ``cpus_per_task`` CPUs (default
    CPUs // workers) and as many torch threads: one evaluation per CPU would oversubscribe the cores
    when torch's own threads already use them all. On a joined cluster a task takes ``cpus_per_task``
    CPUs (default 1). If Ray is already initialised in this process, that connection is used as it is.

    >>> executor = RayExecutor(workers=2)                                          # doctest: +SKIP
    >>> tiesmerge.tuning.search(base, models, "ties", score, executor=executor)    # doctest: +SKIP
    """

    def __init__(self, address: str | None = None, *, workers: int | None = None, cpus_per_task: int | None = None,
                 gpus_per_task: float | None = None, max_retries: int = 3) -> None:
        ray = _import_ray(local=not address)
        wrong = [f"{what} {value}" for what, value in (("workers", workers), ("cpus_per_task", cpus_per_task))
                 if value is not None and value < 1]  # only the values given (hp29 N5)
        if wrong:
            raise ConfigError(f"{' and '.join(wrong)}: {'each' if len(wrong) > 1 else 'it'} must be at least 1")
        if address and workers is not None:
            raise ConfigError("workers sizes the local cluster; a joined cluster runs as many tasks as its CPUs "
                              "(or GPUs) allow", hint="set cpus_per_task instead")
        cores = os.cpu_count() or 1
        if workers is not None and workers > cores and not address:  # hp34 D92: 1000 on 2 CPUs, silently
            warnings.warn(MergeWarning(
                f"workers {workers} is more than this machine's {cores} CPUs: each worker is a process holding a "
                "merged model (hundreds of MB) and Ray runs as many at once as the search has candidates in flight, "
                "so they share the CPUs and add up in memory; the default, one per CPU, is faster unless the "
                "evaluator mostly waits (on a GPU or a service)"), stacklevel=2)
        workers = workers or max(1, cores // (cpus_per_task or 1))
        if cpus_per_task is None:
            cpus_per_task = 1 if address else max(1, cores // workers)
        self.workers, self.cpus_per_task = workers, cpus_per_task
        self._ray = ray
        self._owned = False
        if not ray.is_initialized():
            # the workers import the evaluator's module as the driver does (e.g. a module in the current
            # directory): they get the driver's import path
            # the working folder last: the user's evaluator module is found there, never a shadow of an installed one
            path = os.pathsep.join(p for p in [*sys.path, os.getcwd()] if p and os.path.isdir(p))
            kwargs: dict[str, Any] = {"runtime_env": {"env_vars": {"PYTHONPATH": path}}, "log_to_driver": True}
            held: list[int] = []  # stop signals that came while Ray started: delivered once it has
            with _stop_signals_held(held):
                if address:
                    _check_reachable(address)  # Ray itself retries an address where nothing listens for minutes
                    try:
                        ray.init(address=address, **kwargs)
                    except ValueError as exc:  # Ray's parser: "Invalid address format: not a host" (hp34 D66)
                        raise ConfigError(f"--ray {address}: not an address Ray reads ({str(exc)[:200]})",
                                          hint="give HOST:PORT (as `ray start --head` prints it), ray://HOST:10001, "
                                               "or auto; or --ray without an address for a local cluster") from None
                    except ConnectionError as exc:
                        if address == "auto":  # nothing was connected to: Ray looked for a cluster of this machine
                            raise ConfigError("--ray auto: no Ray cluster runs on this machine for auto to find",
                                              hint="start one with `ray start --head`, give its address, or pass "
                                                   "--ray without an address for a local cluster of this command's "
                                                   "own") from None
                        # something accepted the connection, but no Ray cluster spoke
                        raise ConfigError(f"--ray {address}: a connection was accepted there, but no Ray cluster "
                                          f"answered ({str(exc)[:200] or type(exc).__name__})",
                                          hint="check the address (`ray start --head` prints the one to give; a "
                                               "ray:// address needs the cluster's client server, port 10001), or "
                                               "pass --ray without an address for a local cluster") from None
                else:
                    if not os.environ.get("RAY_TMPDIR"):  # the user's choice of Ray's folder stands
                        # the local cluster's session folder (logs, sockets, ports): private, removed at exit, never
                        # left in $TMPDIR/ray (README, Safety)
                        kwargs["_temp_dir"] = _ray_folder()
                    try:
                        ray.init(num_cpus=workers * cpus_per_task, include_dashboard=False, **kwargs)
                    except (KeyboardInterrupt, SystemExit, TiesMergeError):
                        raise
                    except Exception as exc:  # noqa: BLE001 - Ray's own start-up failures, whatever their type
                        # hp40 R1: "The current node timed out during startup" under ulimit -v was "a bug in
                        # tiesmerge"; Ray's processes need memory and /dev/shm of their own
                        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
                        try:
                            ray.shutdown()  # what it started of the cluster goes
                        except Exception:  # noqa: BLE001, S110 - nothing started: nothing to stop
                            pass
                        raise ConfigError(f"--ray: the local Ray cluster could not start ({first})",
                                          hint="a memory limit (ulimit -v) or a small /dev/shm stops Ray's processes: "
                                               "raise it, or search without --ray (the same candidates, scored in "
                                               "this process)") from None
            self._owned = True
            try:
                for signum in held:  # now handled as the command handles them: its stop, then ray.shutdown
                    os.kill(os.getpid(), signum)
            except BaseException:
                ray.shutdown()  # this executor is never returned: nobody else would close the cluster
                raise
        if gpus_per_task is None:  # one GPU per task where the cluster has GPUs
            gpus_per_task = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.gpus_per_task = gpus_per_task
        self.max_retries = max_retries
        self.merges = 0
        common = {"num_cpus": cpus_per_task, "num_gpus": gpus_per_task, "max_retries": max_retries,
                  "retry_exceptions": False}
        self._merge = ray.remote(_merge_task).options(**common)
        self._score = ray.remote(_score_task).options(**common)
        self._best: tuple[float, str, Any] | None = None  # (score, merge key, the object ref of its tau_m)

    def start(self, job: Job, evaluate: Evaluator, base32: Mapping[str, torch.Tensor],
              dtypes: Mapping[str, torch.dtype]) -> None:
        ray = self._ray
        # the tasks get the sources as arguments (object refs Ray resolves), not inside the job
        self._job, self._dtypes = dataclasses.replace(job, base=None, models=()), dict(dtypes)
        self._base32 = ray.put(_to_numpy(base32))  # once per search: every evaluation reads it
        self._evaluate = ray.put(evaluate)
        self._label = getattr(evaluate, "label", None) or f"the evaluator {evaluator_name(evaluate)}"
        self._best = None
        # state dicts go to the object store once; paths are read by each merge (a cluster needs them
        # on a filesystem every node sees)
        # paths absolute: a worker of a joined cluster runs in a folder of its own, where a relative path names
        # nothing, or something else (hp34 D68)
        self._sources = [ray.put(_to_numpy(s)) if isinstance(s, Mapping)
                         else os.path.abspath(s) if isinstance(s, (str, os.PathLike)) else s
                         for s in (job.base, *job.models)]

    def score(self, batch: Sequence[Candidate], on_scored: OnScored) -> None:
        ray = self._ray
        pending: dict[Any, tuple[Candidate, Any, str]] = {}
        try:
            for key, group in _groups(batch).items():
                options = {k: v for k, v in group[0].options.items() if k != "lam"}
                delta = self._merge.remote(self.cpus_per_task, self._job, self._base32, options, *self._sources)
                self.merges += 1
                for c in group:
                    ref = self._score.remote(self.cpus_per_task, self._evaluate, self._job, self._base32, delta,
                                             c.options, self._dtypes)
                    pending[ref] = (c, delta, key)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    c, delta, key = pending.pop(ref)
                    score, seconds = self._get(ref, c)
                    if better(score, None if self._best is None else self._best[0]):
                        self._best = (score, key, delta)
                    on_scored(c, score, seconds)
        finally:
            for ref in pending:  # interrupted or failed: stop what is still queued
                ray.cancel(ref)

    def _get(self, ref: Any, candidate: Candidate) -> Any:
        """ray.get, with an error raised in a task (a bad option, the evaluator's own) re-raised as itself, and a
        worker that died on every try (killed for memory, a crash in native code, os._exit) as an EvaluatorError."""
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, TiesMergeError):
                raise cause from None
            raise
        except exceptions.RayError as exc:  # WorkerCrashedError, OutOfMemoryError, NodeDiedError...: Ray's own text
            # names log files in the local cluster's folder, which is removed when the search ends
            tries = self.max_retries + 1
            shown = ", ".join(f"{k}={v}" for k, v in candidate.options.items())
            raise EvaluatorError(
                f"{self._label}: the Ray worker merging or scoring candidate {candidate.index} ({shown}) died on each "
                f"of Ray's {tries} tr{'ies' if tries > 1 else 'y'} ({type(exc).__name__}): the process was ended "
                "before it returned a score (out of memory, a crash in native code, os._exit or a signal)",
                hint="run the same search without --ray to see the evaluator's own error (the worker's output, "
                     "if any, is above); with --ray on one machine, fewer --workers leave each more memory"
            ) from None

    def delta(self, merge_key: str) -> dict[str, torch.Tensor] | None:
        if self._best is None or self._best[1] != merge_key:
            return None
        return {k: torch.from_numpy(np.array(v)) for k, v in self._ray.get(self._best[2]).items()}

    def close(self) -> None:
        self._best = None
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()


@contextmanager
def _stop_signals_held(held: list[int]) -> Iterator[None]:
    """While Ray starts: every signal with a Python handler (the command's stop signals, SIGINT's KeyboardInterrupt)
    is recorded in ``held`` instead of handled (a second of the same kind is handled at once, so a start that never
    ends can still be interrupted), and Ray cannot replace those handlers. ray.init installs its own
    SIGTERM handler, a bare sys.exit(15): a SIGTERM seconds into `search --ray` ended it with status 15, no message,
    and Ray's agents orphaned (hp34 D70). After, every handler is put back (_restore_signal_handlers)."""
    import signal
    import threading

    handlers = _signal_handlers()
    if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
        yield
        return
    stops = {s for s, h in handlers.items() if callable(h)}

    def hold(signum: int, frame: Any) -> None:
        if signum in held:  # the same signal twice: the user means it now, should ray.init never end
            handlers[signum](signum, frame)
        held.append(signum)

    real = signal.signal

    def guarded(signum: Any, handler: Any) -> Any:  # what Ray's code calls while it starts
        return hold if int(signum) in stops else real(signum, handler)

    for signum in stops:
        real(signum, hold)
    signal.signal = guarded
    try:
        yield
    finally:
        signal.signal = real
        _restore_signal_handlers(handlers)


def _signal_handlers() -> dict[int, Any]:
    """Every signal's Python-level handler now (None: one set outside Python)."""
    import signal

    return {int(s): signal.getsignal(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    """Put back the handlers ``ray.init`` replaced: Ray's driver installs its own for SIGTERM and others (a
    ``sys.exit(signum)`` and a C++ crash reporter that prints a stack dump), so a stop signal during a search
    ended it without the cleanup the command promises (its temporary output and private folders removed, exit
    status 128 + the signal). Set again even where Python still names the same handler: the C level may not."""
    import signal

    for signum, handler in handlers.items():
        if handler is None:  # set by C code before Ray: not Python's to restore
            continue
        try:
            signal.signal(signum, handler)
        except (ValueError, OSError, RuntimeError):  # not the main thread, or not settable here
            return


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A cluster named ``host:port`` (or ``ray://host:port``) must accept a connection within ``timeout``
    seconds: where nothing listens, ray.init retries without end and ignores SIGTERM for a while. Other
    forms ("auto", a name Ray resolves) are left to Ray."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError, OverflowError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise ConfigError(f"--ray {address}: no Ray cluster answers there within {timeout:g} s ({why})",
                          hint="start one with `ray start --head` (it prints the address to give), or pass --ray "
                               "without an address for a local cluster") from None

