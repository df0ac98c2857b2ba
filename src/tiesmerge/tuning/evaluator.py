"""The user's evaluator, guarded: whatever it raises, or returns instead of a score, becomes an
:class:`~tiesmerge.errors.EvaluatorError` naming it, with the original exception chained.

Used by :func:`~tiesmerge.tuning.tune`, :func:`~tiesmerge.tuning.run_search` and the CLI alike,
so the Python API and the command line report an evaluator's failure the same way. A
``sys.exit()`` inside the evaluator is its failure too (it would otherwise end the tune silently
with the evaluator's exit status); Ctrl-C and a termination signal still stop the run as such.

>>> guard(lambda state: 0.5, "score")({})
0.5
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..errors import ConfigError, EvaluatorError, MergeWarning, TiesMergeError

__all__ = ["GuardedEvaluator", "guard", "evaluator_name"]


def evaluator_name(evaluate: Any, depth: int = 0) -> str:
    """``module:function`` of a callable, as ``--evaluator`` names it; of a callable object, its class's. Read through
    the types alone: a user's object may have a ``__getattr__``, ``__class__`` or ``__repr__`` that raises or never
    returns (hp48 c33, c34: "a bug in tiesmerge", or a hang, before the first candidate)."""
    import functools
    import types

    from .evaluator_digest import _instance_dict, _is_ours, _partial_parts, _type_text

    kind = type(evaluate)
    if issubclass(kind, functools.partial) and depth < 20:  # its repr holds the function's address and calls its
        return f"partial of {evaluator_name(_partial_parts(evaluate)[0], depth + 1)}"  # arguments'
    if issubclass(kind, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        module, name = getattr(evaluate, "__module__", None), getattr(evaluate, "__qualname__", None)
        if isinstance(module, str) and isinstance(name, str):
            code = getattr(evaluate, "__code__", None)
            if name.endswith("<lambda>") and code is not None:  # two lambdas of one module told apart by their
                name = f"{name}#{code_tag(code)}"  # code (hp49 c49: evlam:<lambda> for both); the same lambda
                # on another line is one
            return f"{module}:{name}"
    if issubclass(kind, type):  # a class called as the evaluator (hp49 c40: "builtins:type" for every class)
        return f"{_type_text(evaluate, '__module__')}:{_type_text(evaluate, '__qualname__')}"
    own = _instance_dict(evaluate) or {}  # a class-based decorator's functools.update_wrapper copies the wrapped
    module, name = own.get("__module__"), own.get("__qualname__")  # function's names here (hp49 c33: every
    if type(module) is str and type(name) is str:  # wrapped evaluator was the decorator's class, one search)
        wrapped = own.get("__wrapped__")
        if name.endswith("<lambda>") and issubclass(type(wrapped), types.FunctionType) and depth < 20:
            return evaluator_name(wrapped, depth + 1)  # its code told apart (hp50 k27)
        return f"{module}:{name}"
    if _is_ours(kind):  # tiesmerge's own evaluators say what they score on
        try:
            text = repr(evaluate)
        except Exception:  # noqa: BLE001 - a repr of its data may fail
            text = ""
        if text and " at 0x" not in text:
            return text[:80]
    return f"{_type_text(kind, '__module__')}:{_type_text(kind, '__qualname__')}"


def code_tag(code: Any) -> str:
    """A short digest of a code object, the same in every process: what tells lambdas and nested functions apart."""
    import hashlib

    return hashlib.sha256(_code_text(code).encode()).hexdigest()[:8]


def _code_text(code: Any, depth: int = 0) -> str:
    """A code object as text that is the same in every process: its bytecode, names and constants, nested code (a
    generator expression's) by its own text, sets by their sorted items (hp50 k05, k12: an address in a nested code
    object's repr, a frozenset's hash order, made each run another evaluator)."""
    import types

    def const(value: Any) -> str:
        if isinstance(value, types.CodeType):
            return _code_text(value, depth + 1) if depth < 20 else "<code>"
        if isinstance(value, (frozenset, set)):
            return "{" + ",".join(sorted(const(v) for v in value)) + "}"
        if isinstance(value, tuple):
            return "(" + ",".join(const(v) for v in value) + ")"
        if type(value) is int:  # hex: no limit on its digits (repr refuses past 4,300: hp51 d18, "a bug")
            return hex(value)
        return repr(value)

    return f"{code.co_code.hex()}|{code.co_names}|{','.join(const(c) for c in code.co_consts)}"


def _shown(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters: an evaluator may hand over a whole state dict (hp34 D69: 84 KB)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__}, {len(text):,} characters)"


def _said(exc: BaseException, limit: int = 300) -> str:
    """An exception's message for ours: its ``str`` may itself raise (hp57 c44: "unexpected RuntimeError ... a bug in
    tiesmerge"), and a newline in it would read as a line of tiesmerge's own (c45)."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 -- the user's __str__, whatever it raises
        return "(its message could not be shown: its __str__ raised)"
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    if not text.strip():  # a bare MemoryError() read "raised MemoryError: " and nothing (hp86b c05n)
        return "(no message)"
    return text if len(text) <= limit else text[:limit] + "..."


def _builtin(evaluate: Any) -> bool:
    """Whether ``evaluate`` is one of tiesmerge's own evaluators, whose typed errors say what is wrong themselves."""
    target = evaluate.__func__ if inspect.ismethod(evaluate) else evaluate
    # (a function's module, else its class's: never an attribute an object of the user's answers itself)
    module = target.__module__ if inspect.isfunction(target) else type(evaluate).__module__
    return isinstance(module, str) and (module == "tiesmerge" or module.startswith("tiesmerge."))


class GuardedEvaluator:
    """``evaluate`` whose failures are typed. A class, not a closure, so that it pickles wherever
    the evaluator does (search's Ray workers). ``finite``: a NaN or infinite score is an error too
    (the CLI's rule); else a NaN score is kept and never wins (the API's)."""

    def __init__(self, evaluate: Callable[[Mapping[str, Any]], float], label: str, *, finite: bool = False) -> None:
        self.evaluate, self.label, self.finite = evaluate, label, finite

    def __call__(self, state: Mapping[str, Any]) -> float:
        pid = os.getpid()
        try:
            score = self._call(state)
        except BaseException as exc:
            if os.getpid() != pid:  # a child the evaluator forked (os.fork) left its own code by an exception: it
                _leave_child(exc)  # ends there, never in tiesmerge's reporting (hp49 c28: its "error:" lines)
            raise
        if os.getpid() != pid:  # a forked child returning into tiesmerge's code would run the rest of the search
            os._exit(0)
        return score

    def _call(self, state: Mapping[str, Any]) -> float:
        try:
            with process_state_kept(self.label):
                try:
                    score = self.evaluate(state)
                except TiesMergeError as exc:
                    if _builtin(self.evaluate):
                        raise
                    # a user's evaluator raising one of tiesmerge's errors (its own, or a merge's it ran): printed
                    # bare, with the command's --help as the hint, it did not say where it came from (hp84b c07)
                    # its message alone (str() holds the hint too, said twice: hp85b c05); the hint marked as the
                    # evaluator's own, not one about the command's options (c06: a nested merge's "check the path
                    # of the base" read as about --base)
                    raise EvaluatorError(
                        f"{self.label}: raised {type(exc).__name__}: {_said(exc.message)}",
                        hint=(f"the evaluator's own hint: {exc.hint}" if exc.hint else
                              "fix the evaluator (--debug shows its traceback)")) from exc
        except (TiesMergeError, KeyboardInterrupt):  # ours already say what is wrong; Ctrl-C stays Ctrl-C
            raise
        except SystemExit as exc:
            raise EvaluatorError(f"{self.label}: called sys.exit({_shown(exc.code)}) instead of returning a score",
                                 hint="an evaluator must return a number; raise an exception to report a failure"
                                 ) from exc
        except BaseException as exc:  # noqa: BLE001 - an Exception, or GeneratorExit, pytest's Skipped, a class of
            # the user's own: all raised by the evaluator, none a library's failure (hp34 D51, D52)
            raise EvaluatorError(f"{self.label}: raised {type(exc).__name__}: {_said(exc)}",
                                 hint="fix the evaluator (--debug, or the exception's __cause__, shows its "
                                      "traceback)") from exc
        try:
            return self._read(score)
        except (TiesMergeError, KeyboardInterrupt):
            raise
        except SystemExit as exc:  # a returned object's __float__ calling sys.exit: exit 0 and no word (hp49 c38)
            raise EvaluatorError(f"{self.label}: returned a {type(score).__name__} whose own code called "
                                 f"sys.exit({_text(exc.code)}) when it was read as a score",
                                 hint="return a plain number (a float, or a 0-d numpy array or torch tensor)") from exc
        except Exception as exc:  # noqa: BLE001 - the returned object's own code (a __getattr__, a dtype property)
            raise EvaluatorError(  # raised as it was read: the evaluator's to fix, not tiesmerge's bug (hp48 c35)
                f"{self.label}: returned a {type(score).__name__} whose own code raised {type(exc).__name__} "
                f"({str(exc)[:200]}) when it was read as a score",
                hint="return a plain number (a float, or a 0-d numpy array or torch tensor)") from exc

    def _read(self, score: Any) -> float:
        """The evaluator's return value as a float score, or an EvaluatorError saying why it is none."""
        return read_score(score, self.label, finite=self.finite)


def read_score(score: Any, label: str, *, finite: bool = False) -> float:
    """A score as a float: Python's real numbers (Fraction, Decimal too), numpy and torch scalars; booleans, text,
    arrays and (with ``finite``) NaN, Inf and numbers past ±MAX_SCORE are an EvaluatorError naming ``label``."""
    # (the body of GuardedEvaluator._read, shared with finetune's validate: hp68b c16)
    if inspect.iscoroutine(score) or inspect.isawaitable(score):
        # an async def evaluator: its coroutine closed, never awaited, so Python adds no "was never awaited" warning
        # naming tiesmerge's own line after the error (hp87b c70)
        close = getattr(score, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()
        raise EvaluatorError(f"{label}: returned a coroutine: it is an async function, and tiesmerge calls the "
                             "evaluator as a plain one", hint="give a plain def returning the score (inside it, "
                                                              "asyncio.run(your_coroutine(state)) awaits async code)")
    score = _detached(score)
    if issubclass(type(score), (bool, str, bytes)) or _is_boolean(score) or not _is_real(score) and \
            not _is_scalar(score):  # numpy.str_ is a 0-d str that float() reads: no score (hp41 C56)
        raise EvaluatorError(f"{label}: returned {_text(score)!r} ({type(score).__name__}), not a number",
                             hint="the evaluator must return a validation score, higher is better")
    try:
        value = float(score)
    except (OverflowError, ValueError, TypeError) as exc:  # an int past float's range (10**400)
        raise EvaluatorError(f"{label}: returned {_magnitude(score)}, which cannot be read as a score ({exc})",
                             hint="the evaluator must return a validation score (a float), higher is better"
                             ) from None
    if not math.isfinite(value) and _finite_number(score):  # hp55 c43-c45: a finite Decimal('1e999999') or
        raise EvaluatorError(  # np.longdouble('1e4000') "returned inf": float() overflowed, not the score
            f"{label}: returned {_magnitude(score)}, a finite number past a float's range (±1.8e308)",
            hint="return a score of ordinary size (an accuracy, a negative loss or perplexity)")
    if finite and not math.isfinite(value):
        raise EvaluatorError(f"{label}: returned {value}, not a finite number",
                             hint="the evaluator must return a validation score, higher is better")
    if not math.isfinite(value):  # the API keeps it; a +inf silently not winning surprised (hp41 C3)
        _said_once((f"score {value}", label),
                   f"{label} returned {value}: a score that is not a finite number never wins (it is kept "
                   f"among the trials, and in a log as {str(value)!r}), so the best is the best finite score",
                   stacklevel=4)
    if finite and abs(value) > MAX_SCORE:  # the report's axes span max - min: Inf past ~1.8e308
        # repr: the value as returned (1.001e+300 showed as "1e+300, past the ±1e+300", hp40 E1)
        raise EvaluatorError(f"{label}: returned {value!r}, past the ±{MAX_SCORE:.0e} a score may reach",
                             hint="return a score of ordinary size (an accuracy, a negative loss or perplexity)")
    return value


def _magnitude(score: Any) -> str:
    """A huge number as a message shows it: its size, not 400 digits (a Fraction by its value, not its numerator)."""
    import decimal
    import fractions

    try:
        if isinstance(score, int):
            return f"an integer of about {int(score.bit_length() * math.log10(2)) + 1:,} digits"
        if isinstance(score, fractions.Fraction):
            digits = len(str(abs(score.numerator))) - len(str(score.denominator))
            return f"a fraction of about 1e{digits}"
        if isinstance(score, decimal.Decimal):
            return f"{score:.3e}"
        import numpy as np

        if isinstance(score, np.floating):  # its own digits: a long double past a float's range
            return np.format_float_scientific(score, precision=3)
        return str(score)[:80]
    except Exception:  # noqa: BLE001 - a user's number type whose own formatting fails
        return str(type(score).__name__)


def _finite_number(score: Any) -> bool:
    """Whether ``score`` is finite in its own type (a Decimal, a long double), though float() overflows it."""
    import decimal

    try:
        if isinstance(score, decimal.Decimal):
            return score.is_finite()
        import numpy as np

        if isinstance(score, np.floating):
            return bool(np.isfinite(score))
    except Exception:  # noqa: BLE001 - a user's number type
        return False
    return False


def _leave_child(exc: BaseException) -> None:
    """End a forked child as its own exception would end a process of its own: sys.exit's code, else 1."""
    stop = exc if isinstance(exc, SystemExit) else \
        exc.__cause__ if isinstance(exc, EvaluatorError) and isinstance(exc.__cause__, SystemExit) else None
    given = None if stop is None else stop.code
    code = given if isinstance(given, int) else 0 if stop is not None and given is None else 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _working_folder() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # removed under us: nothing to go back to
        return None


def _current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status): os.umask() alone sets
    one to read the old, and a writer thread creating a file in between would take the wrong mode."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    before = os.umask(0o022)
    os.umask(before)
    return before


@contextlib.contextmanager
def process_state_kept(label: str, when: str = "after each call") -> Iterator[None]:
    """The working folder, the umask and torch's default device and dtype as they were, whatever the code inside
    (a user's evaluator, or its module's import: hp45 c35, hp46 c07, c08) changed; each change said once."""
    streams = {"stdout": sys.stdout, "stderr": sys.stderr}
    cwd = _working_folder()
    umask = _current_umask()
    torch_defaults = torch_defaults_now()
    handlers = _stop_handlers()
    try:
        yield
    finally:
        _restore_streams(streams, label, when)  # first: what is said below goes to them
        _restore_working_folder(cwd, label, when)
        _restore_umask(umask, label, when)
        restore_torch_defaults(torch_defaults, label, when)
        _restore_stop_handlers(handlers, label, when)


def _restore_streams(before: dict[str, Any], label: str, when: str = "after each call") -> None:
    """An evaluator that closed sys.stdout (or replaced it) made the search's next line fail as "unexpected
    ValueError: I/O operation on closed file ... a bug in tiesmerge" (hp84b c53): the stream is put back (a closed
    one reopened on its descriptor, which Python's standard streams never close), said once per evaluator."""
    changed = []
    for name, stream in before.items():
        if getattr(sys, name) is stream and not getattr(stream, "closed", False):
            continue
        if getattr(stream, "closed", False):
            try:
                stream = open(1 if name == "stdout" else 2, "w", closefd=False,  # noqa: SIM115 - the process's own
                              buffering=1,  # line by line, as a terminal's
                              encoding=getattr(stream, "encoding", None) or "utf-8", errors="backslashreplace")
            except (OSError, ValueError):
                continue
        setattr(sys, name, stream)
        changed.append(f"sys.{name}")
    if changed:
        _said_once(("streams", label), f"{label} closed or replaced {' and '.join(changed)}; tiesmerge put "
                                       f"{'them' if len(changed) > 1 else 'it'} back {when}, so that the search "
                                       "can still report")


def _stop_handlers() -> dict[int, Any]:
    """The command's own stop handlers now (tiesmerge.cli.main's), where they are set: {} outside a command."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    main = sys.modules.get("tiesmerge.cli.main")
    ours = getattr(main, "_on_stop_signal", None)
    stops = (signal.SIGINT, *getattr(main, "STOP_SIGNALS", ()))
    return {int(n): ours for n in stops if ours is not None and signal.getsignal(n) is ours}


def _restore_stop_handlers(before: dict[int, Any], label: str, when: str = "after each call") -> None:
    """An evaluator that sets its own SIGTERM (or SIGINT) handler replaced the command's, so a later stop was
    ignored: the search ran on and exited 0 (hp61b c25). Put back, said once per evaluator."""
    import signal

    changed = []
    for signum, handler in before.items():
        try:
            if signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)
                changed.append(signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else
                               str(signum))
        except (ValueError, OSError):
            continue
    if changed:
        _said_once(("signals", label), f"{label} set its own handler for {', '.join(changed[:4])}; tiesmerge put "
                                       f"its own back {when}, so that a stop still ends the command (a stop while "
                                       "the evaluator runs is the evaluator's to handle)")


def _restore_umask(before: int, label: str, when: str = "after each call") -> None:
    """An evaluator that changes the process's umask (os.umask(0o777)) is put back too: the output was written with
    mode 000 after it (hp41 C40). Said once per evaluator."""
    now = _current_umask()
    if now == before:
        return
    os.umask(before)
    _said_once(("umask", label), f"{label} changed the umask (to {now:03o}); tiesmerge set it back to {before:03o} "
                                 f"{when}, since the output's files take their modes from it")


def _restore_working_folder(cwd: str | None, label: str, when: str = "after each call") -> None:
    """An evaluator that changes the working folder (some evaluation harnesses do) is put back where it was: the
    search's log, its outputs and the models' relative paths were read against the new folder (hp40 D19: the log
    landed in the evaluator's folder and the base was "no such file"). Said once per evaluator."""
    if cwd is None:
        return
    try:
        now = os.getcwd()
    except OSError:
        now = None
    if now == cwd:
        return
    os.chdir(cwd)
    _said_once(("cwd", label), f"{label} changed the working folder (to {now}); tiesmerge changed it back to {cwd} "
                               f"{when}, since the command's paths are relative to it")


def torch_defaults_now() -> tuple[Any, Any, bool] | None:
    """torch's default device and dtype, and whether it flushes subnormal floats to zero, where torch is loaded (an
    evaluator that never imports it changes none of them)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "get_default_device"):
        return None
    return torch.get_default_device(), torch.get_default_dtype(), _flushes_denormals(torch)


def _flushes_denormals(torch: Any) -> bool:
    """Whether this thread flushes subnormal floats to zero (torch.set_flush_denormal has no getter): a subnormal
    times 1 is 0 then. (hp48 c20: an evaluator module turning it on at import made a merge of small deltas write 0.)"""
    return float(torch.tensor([1e-39], dtype=torch.float32, device="cpu").mul(1.0)[0]) == 0.0


def restore_torch_defaults(before: tuple[Any, Any, bool] | None, label: str, when: str = "after each call") -> None:
    """An evaluator that sets torch's default device (torch.set_default_device("meta"), a harness's "cuda") or dtype
    is put back too: the next merge made its tensors there, and failed as "a bug in tiesmerge" (hp42 D16); and one
    that flushes subnormal floats to zero (the merges' small deltas became 0: hp48 c20)."""
    now = torch_defaults_now()
    if now is None or now == before:
        return
    import torch

    if before is None:  # torch was imported inside (an evaluator module's import): its own defaults were in force
        before = (torch.device("cpu"), torch.float32, False)
        if now == before:
            return
    if now[:2] != before[:2]:
        torch.set_default_device(None if before[0] == torch.device("cpu") else before[0])
        torch.set_default_dtype(before[1])
        _said_once(("torch defaults", label), f"{label} changed torch's default device or dtype (to {now[0]}, "
                                              f"{now[1]}); tiesmerge set them back to {before[0]}, {before[1]} {when}, "
                                              "since the merges make their tensors with them")
    if now[2] != before[2]:
        torch.set_flush_denormal(before[2])
        _said_once(("flush denormal", label), f"{label} {'turned on' if now[2] else 'turned off'} torch's flushing "
                                              f"of subnormal floats to zero (torch.set_flush_denormal); tiesmerge set "
                                              f"it back {when}, since the merges' small task-vector entries would "
                                              "become 0")


def _said_once(key: tuple[str, str], message: str, stacklevel: int = 4) -> None:
    """A warning about what an evaluator did (changed the process's state, returned a non-finite score), once per
    (what, evaluator)."""
    if key not in _SAID:
        _SAID.add(key)
        warnings.warn(MergeWarning(message), stacklevel=stacklevel)


_SAID: set[tuple[str, str]] = set()  # (what, evaluator) already said

# A search plots its scores: a range of 2e308 (scores of +-1e308) is Inf there and the report failed after all the
# scoring; +-1e300 was measured to plot. Any finite -perplexity (exp of at most 709 nats) stays far below.
MAX_SCORE = 1e300


def format_score(score: float) -> str:
    """A score as the tables and progress lines print it: 4 decimals for accuracies and losses, 4 significant
    digits below 0.001 and past a million (a perplexity of 3e12 in full is 13 digits, a score of 1e300 would be 301)."""
    if score != 0 and abs(score) < 1e-3:  # a loss of 1e-5: 4 decimals printed every candidate as 0.0000 (hp40 E5)
        return f"{score:.4g}"
    return f"{score:.4f}" if abs(score) < 1e6 else f"{score:.4g}"


def _text(value: Any, limit: int = 80) -> str:
    """``str(value)`` cut to ``limit`` characters, or its type's name where its own ``__str__`` fails."""
    try:
        return str(value)[:limit]
    except Exception:  # noqa: BLE001 - a returned object's __str__ is the evaluator's code
        return f"<{type(value).__name__}>"


def _detached(score: Any) -> Any:
    """A torch tensor without its autograd graph (float() of one that requires grad warns); anything else as is."""
    detach = getattr(score, "detach", None)
    return detach() if callable(detach) and hasattr(score, "requires_grad") else score


def _is_boolean(score: Any) -> bool:
    """A numpy bool or a torch/numpy array of booleans: refused as Python's True is (hp40 E2: np.True_ and
    torch.tensor(True) were read as the score 1.0)."""
    dtype = getattr(score, "dtype", None)
    return dtype is not None and str(dtype) in ("bool", "torch.bool")


def _is_real(score: Any) -> bool:
    """int, float, and the other real numbers Python knows (Fraction, Decimal: hp41 C2 refused them)."""
    import decimal
    import numbers

    return isinstance(score, (numbers.Real, decimal.Decimal))


def _is_scalar(score: Any) -> bool:
    """A numpy or torch scalar (a 0-d array or tensor), which float() reads exactly."""
    shape = getattr(score, "shape", None)
    if shape is None or tuple(shape) != ():
        return False
    if getattr(getattr(score, "device", None), "type", None) == "meta":  # no value to read (hp41 C55)
        return False
    kind = getattr(getattr(score, "dtype", None), "kind", None)
    if kind is not None and kind not in "iuf":  # numpy's: an object array holding "0.5" was read as 0.5 (hp42 D57)
        return False
    try:
        float(score)
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        return False
    return not getattr(getattr(score, "dtype", None), "is_complex", False)


def check_callback(callback: Any, name: str, what: str) -> None:
    """A progress callback (tune's on_point, run_search's on_trial) that is None or callable, said before any merge
    (hp77b c18, c19: on_point=5 was a TypeError traceback after the first candidate was scored)."""
    if callback is not None and not callable(callback):
        raise ConfigError(f"{name} is {_shown(callback)}, not a function", hint=f"give a function taking {what} "
                          f"(called after each is scored), or leave {name} out")


def check_evaluated_models(evaluate: Any, models: Any) -> None:
    """A built-in evaluator's check of the models it will score (classifier-accuracy: heads that are no softmax,
    hp73b c05, c06), guarded or not; a user's evaluator is not asked (its attributes are its own)."""
    inner = evaluate.evaluate if issubclass(type(evaluate), GuardedEvaluator) else evaluate
    if type(inner).__module__ == "tiesmerge.evaluation.builtin" and isinstance(models, (list, tuple)):
        inner.check_models(models)


def guard(evaluate: Callable[[Mapping[str, Any]], float], label: str | None = None, *,
          finite: bool = False) -> GuardedEvaluator:
    """``evaluate`` guarded (once: a guarded evaluator is returned as it is)."""
    if issubclass(type(evaluate), GuardedEvaluator):  # not isinstance: it reads a user's __class__ (hp48 c34)
        return evaluate
    if not callable(evaluate):
        raise EvaluatorError(f"the evaluator {_shown(evaluate)} is not callable",
                             hint="pass a function taking a state dict and returning a score")
    return GuardedEvaluator(evaluate, label or f"the evaluator {evaluator_name(evaluate)}", finite=finite)
