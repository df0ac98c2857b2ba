"""What a user's evaluator was built with, as a digest a search log keeps, so that a resume with an evaluator built
otherwise (another sign, other validation data) is refused rather than mixing two evaluators' scores.

The digest walks a functools.partial's arguments, a function's defaults and the values its closure holds, through
partials, decorators (``__wrapped__``) and the functions and bound methods a closure holds. It must never fail and
never run long on whatever a user's evaluator holds: every value is read through its base type's own methods (a
subclass's ``__repr__``, ``__iter__`` or ``__getitem__`` may raise or never end), within a budget of bytes and of
values, and a value that still cannot be read counts by its type (hostile passes 41 C4, C7 and 42 D5–D12).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import types
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["evaluator_state", "evaluator_objects", "evaluator_module", "evaluator_attribute"]


# Every test of a user's value goes through its type, never the value itself: isinstance() reads a __class__
# property, hasattr() runs __getattr__/__getattribute__, and either may raise or never return (hp44 c11).
def _is(value: Any, kinds: Any) -> bool:
    return issubclass(type(value), kinds)


def _is_function(value: Any) -> bool:
    return _is(value, types.FunctionType)


def _is_method(value: Any) -> bool:
    return _is(value, types.MethodType)


def _is_class(value: Any) -> bool:
    return _is(value, type)


# C routines: builtin functions and methods, and the method and slot descriptors of C types (torch.Tensor.amax,
# float.__neg__, (2.0).__mul__), which have no __dict__ and no code: digested by their qualified names
_C_ROUTINES = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
               types.MethodWrapperType, types.ClassMethodDescriptorType)


def _is_builtin(value: Any) -> bool:
    return _is(value, _C_ROUTINES)


def _builtin_module(obj: Any) -> str:
    """A C routine's module: its own ``__module__`` or, for a descriptor (which has none), its class's."""
    module = getattr(obj, "__module__", None)  # C types only: no user's __getattr__ runs
    if type(module) is not str:
        owner = getattr(obj, "__objclass__", None)
        module = _type_text(owner, "__module__") if _is_class(owner) else "?"
    return module


def _is_module(value: Any) -> bool:
    return _is(value, types.ModuleType)


def _is_routine(value: Any) -> bool:
    return _is(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.MethodDescriptorType,
                       types.WrapperDescriptorType, types.MethodWrapperType))


_NONE = object()


def _type_text(cls: type, attr: str) -> str:
    """A class's ``__module__``, ``__qualname__`` or ``__name__`` read through ``type``'s own descriptor: a metaclass
    may define them as properties, and a class's ``__module__`` may hold any object (hp45 c02)."""
    try:
        value = type.__dict__[attr].__get__(cls, type)
    except Exception:  # noqa: BLE001 - not a class, or a descriptor that refuses it
        return "?"
    return value if type(value) is str else "?"


def _is_ours(cls: type) -> bool:
    """A class of tiesmerge's own package: ``tiesmerge`` or ``tiesmerge.*``, never a user's ``tiesmerge_eval`` module
    (hp46 c03: its evaluator object escaped the digest and the warning)."""
    module = _type_text(cls, "__module__")
    return module == "tiesmerge" or module.startswith("tiesmerge.")


def _mro(cls: type) -> tuple[type, ...]:
    mro = type.__dict__["__mro__"].__get__(cls, type)
    return mro if type(mro) is tuple else (cls,)


def _class_dict(cls: type) -> Mapping[str, Any]:
    return type.__dict__["__dict__"].__get__(cls, type)


def _class_attr(cls: type, name: str) -> Any:
    """``name`` as the class (or a base) defines it, found without running any of their code; _NONE where none does."""
    for klass in _mro(cls):
        found = _class_dict(klass).get(name, _NONE)
        if found is not _NONE:
            return found
    return _NONE


def _instance_dict(value: Any) -> dict | None:
    """The instance's ``__dict__`` through the interpreter's own slot, never a class's ``__dict__`` property."""
    entry = _class_attr(type(value), "__dict__")
    if type(entry) is not types.GetSetDescriptorType:
        return None
    try:
        found = entry.__get__(value, type(value))
    except Exception:  # noqa: BLE001 - a descriptor of another class
        return None
    return found if type(found) is dict else None


def _has_dict(value: Any) -> bool:
    return _instance_dict(value) is not None


def _slots(cls: type) -> list[str]:
    names: list[str] = []
    for klass in _mro(cls)[:-1]:
        slots = _class_dict(klass).get("__slots__", ())
        slots = (slots,) if type(slots) is str else slots
        names += [s for s in (slots if _is(slots, (tuple, list)) else ()) if type(s) is str]
    return names


def _has_state(value: Any) -> bool:
    """Instance attributes: a ``__dict__``, or ``__slots__`` of its class (hp44 c36: a slots-only evaluator object
    escaped both the digest and the warning)."""
    return _has_dict(value) or bool(_slots(type(value)))


_MAX_BYTES = 1 << 28  # tensors and arrays by their bytes up to this in all; past it, by shape and dtype
_MAX_VALUES = 1 << 20  # values visited in all: a list of a billion items (or an endless one) is cut here
_MAX_DEPTH = 16  # nesting followed
_MAX_BUILD_DEPTH = 8  # partials and decorators followed


def evaluator_state(evaluate: Any) -> str | None:
    """A digest of what ``evaluate`` (a user's evaluator; a GuardedEvaluator is unwrapped) was built with beyond its
    code, or None where it carries nothing (a plain function) or is tiesmerge's own (a built-in's data file has its
    own digest). A closure's dicts, sets and objects are left out: they are a cache or a counter as often as a
    setting, and a search resumed in the same process would be refused for what the evaluator recorded itself."""
    inner = _unguarded(evaluate)
    if _is_ours(type(inner)):
        return None
    held = _built_with(inner, depth=0, objects=[])
    if not held:
        return None
    digest = hashlib.sha256()
    _feed(digest, held, depth=0, budget=[_MAX_BYTES, _MAX_VALUES])
    return digest.hexdigest()[:16]


def evaluator_objects(evaluate: Any) -> list[str]:
    """The classes of the objects whose attributes decide ``evaluate``'s scores and are not digested: the evaluator
    itself when it is a callable object or a bound method, and those a partial calls or a closure or decorator holds
    as a bound method (hp41 C5; hp42 D29: ``partial(E(sign).score)``, ``partial(C(sign))``, a wraps decorator around
    a bound method, a lambda over one)."""
    inner = _unguarded(evaluate)
    objects: list[str] = []
    if _is_callable_object(inner):
        objects.append(_type_text(type(inner), "__qualname__"))
    elif _is_method(inner):
        objects.append(_owner_name(inner))
    else:
        _built_with(inner, depth=0, objects=objects)
    return list(dict.fromkeys(objects))


def evaluator_module(evaluate: Any) -> str | None:
    """The name of the module whose code ``evaluate`` runs: through tiesmerge's guard, partials, bound methods and
    wrappers to the function (hp46 c20: a module-level ``score = partial(_score, sign=1)`` was read as functools'),
    or a callable object's class; read through the interpreter's own slots, never a user's attribute lookup."""
    inner = _unguarded(evaluate)
    for _ in range(_MAX_BUILD_DEPTH):
        if _is(inner, functools.partial):
            inner = _partial_parts(inner)[0]
        elif _is_method(inner):
            inner = inner.__func__
        elif (wrapped := _wrapped_of(inner)) is not None:
            inner = wrapped
        else:
            break
    if _is_builtin(inner):
        return _builtin_module(inner)
    if _is_function(inner):
        module = inner.__module__
        return module if type(module) is str else None
    return _type_text(inner if _is_class(inner) else type(inner), "__module__")


def _unguarded(evaluate: Any) -> Any:
    """The user's evaluator inside tiesmerge's GuardedEvaluator; anything else as it is (a user's object with an
    ``evaluate`` method of its own is the evaluator itself, not a wrapper)."""
    kind = type(evaluate)
    if _type_text(kind, "__name__") == "GuardedEvaluator" and _type_text(kind, "__module__").startswith("tiesmerge."):
        return object.__getattribute__(evaluate, "evaluate")
    return evaluate


def evaluator_attribute(evaluate: Any, name: str) -> Any:
    """The evaluator's own instance attribute ``name`` (inside tiesmerge's guard too), or None: read through the
    interpreter's slot, never running the user's ``__getattr__`` or properties."""
    return (_instance_dict(_unguarded(evaluate)) or {}).get(name)


def _is_users_object(value: Any) -> bool:
    """An instance of a class of the user's own with attributes (not a module, function, class or a torch module,
    whose weights each candidate replaces, nor a library's value)."""
    if _is(value, types.SimpleNamespace):  # settings or a cache it fills, alike to the digest: warned, as an
        return True  # argparse.Namespace is (hp52 c36: silent; hp53 c11: digested, its own log refused mid-session)
    if _is_module(value) or _is_class(value) or _is_routine(value) or \
            _is(value, torch.nn.Module) or _is_setting(value):
        return False
    root = _type_text(type(value), "__module__").split(".")[0]
    return _has_state(value) and root not in ("tiesmerge", "builtins", "torch", "numpy", "transformers",
                                                       "collections", "functools", "typing", "pandas")


def _wrapped_of(value: Any) -> Any:
    """What a callable that is not a function wraps (functools.lru_cache's wrapper, a class-based decorator: its
    instance's ``__wrapped__``), or None. A ``__wrapped__`` its class defines (a property may run anything: hp45 c02)
    is not followed."""
    if _is_function(value) or _is_method(value) or _is(value, functools.partial) or not callable(value):
        return None
    if _class_attr(type(value), "__wrapped__") is not _NONE:
        return None
    attributes = _instance_dict(value)
    wrapped = attributes.get("__wrapped__") if attributes is not None else None
    return wrapped if wrapped is not None and wrapped is not value else None


def _is_wrapper(value: Any) -> bool:
    return _wrapped_of(value) is not None


def _is_callable_object(value: Any) -> bool:
    return callable(value) and not (_is_function(value) or _is_method(value) or _is_class(value)
                                    or _is_builtin(value) or _is(value, functools.partial)
                                    or _is_wrapper(value)) \
        and not _is_ours(type(value)) and _has_state(value)


def _owner_name(method: Any) -> str:
    owner = method.__self__
    return _type_text(owner if _is_class(owner) else type(owner), "__qualname__")


def _partial_parts(fn: Any) -> tuple[Any, tuple, dict]:
    """A partial's function, arguments and keywords from its own slots: a subclass may make them properties that
    never return (hp45 c02)."""
    parts = [functools.partial.__dict__[name].__get__(fn, functools.partial) for name in ("func", "args", "keywords")]
    return parts[0], parts[1] if type(parts[1]) is tuple else (), parts[2] if type(parts[2]) is dict else {}


def _built_with(fn: Any, *, depth: int, objects: list[str]) -> list[Any]:
    """What a partial, function or bound method carries beyond its code; [] for nothing. Objects whose attributes
    decide the scores are named into ``objects``."""
    if depth > _MAX_BUILD_DEPTH:
        return []
    if _is(fn, functools.partial):
        func, args, keywords = _partial_parts(fn)
        if _is_callable_object(func):
            objects.append(_type_text(type(func), "__qualname__"))
        return [_qualified(func), list(args), dict(keywords), _built_with(func, depth=depth + 1, objects=objects)]
    if _is_method(fn):  # its function's build; its object's attributes are not digested (warned)
        objects.append(_owner_name(fn))
        return [_qualified(fn.__func__), _built_with(fn.__func__, depth=depth + 1, objects=objects)]
    wrapped = _wrapped_of(fn)
    if wrapped is not None:  # functools.lru_cache, cache, a class-based decorator that sets __wrapped__ (hp43 c26)
        # the wrapped function's own name too: a lambda's carries a hash of its code (hp51 d03, d22: lru_cache and
        # numba.njit over `lambda t: 1.0` and `lambda t: -1.0` digested alike)
        return [_qualified(fn), _qualified(wrapped), _built_with(wrapped, depth=depth + 1, objects=objects)]
    if not _is_function(fn):
        return []
    held: list[Any] = []
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell (a name assigned later)
            continue
        if _is_function(value) or _is_method(value) or _is(value, functools.partial) or \
                _is_wrapper(value):
            held.append([_qualified(value), _built_with(value, depth=depth + 1, objects=objects)])  # a decorator's
        elif not _is(value, (Mapping, set)) and _is_setting(value):
            held.append(value)
        elif _is(value, (Mapping, set)) and not _objects_in(value):  # a dict or a set: often a cache the evaluator
            objects.append(_type_text(type(value), "__qualname__"))  # fills, not compared but said (hp52 c37); one
            # holding metrics' objects is said by them (below)
        elif _is(value, torch.nn.Module):  # a model the candidates' weights are loaded into: its class, not its
            held.append(_qualified(type(value)))  # weights (hp51 d01: ReLU and Tanh held alike)
        elif _is_users_object(value):  # an object whose attributes decide the scores (`lambda sd: e.score(sd)`):
            # not digested (they hold its caches too), warned (hp43 c55)
            objects.append(_type_text(type(value), "__qualname__"))
    wrapped = fn.__dict__.get("__wrapped__")  # functools.wraps (a function's own dict: no descriptor runs)
    if wrapped is not None and wrapped is not fn:
        held.append([_qualified(wrapped), _built_with(wrapped, depth=depth + 1, objects=objects)])
    if fn.__defaults__ or fn.__kwdefaults__:
        held += [fn.__defaults__, fn.__kwdefaults__]
    for value in [*_cell_values(fn), *(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()]:
        _objects_held(value, objects)  # metrics kept in a list: their objects are warned as one held directly is
    # by identity and type, never ==: a numpy array among them made `h not in ([], None)` raise (hp42 D11)
    return held if any(not (h is None or (type(h) is list and not h)) for h in held) else []


def _cell_values(fn: Any) -> list[Any]:
    values = []
    for cell in fn.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return values


def _objects_in(value: Any) -> list[str]:
    found: list[str] = []
    _objects_held(value, found)
    return found


def _objects_held(value: Any, objects: list[str]) -> None:
    """The objects whose attributes decide the scores among a list's, tuple's or dict's items (one level, the first
    1,000): bound methods, partials over them or over callable objects, callable objects (hp46 c19: `[Metric(sign).
    score]` held in a list was neither digested nor warned, where held directly it is warned)."""
    if _is(value, dict):
        items = list(itertools.islice(dict.values(value), 1000))
    elif _is(value, (list, tuple)):
        items = list(itertools.islice(list.__iter__(value) if _is(value, list) else tuple.__iter__(value), 1000))
    else:
        return
    for item in items:
        if _is(item, functools.partial):
            item = _partial_parts(item)[0]
        if _is_method(item) and not _is_class(item.__self__) and not _is_module(item.__self__):
            objects.append(_owner_name(item))
        elif _is_callable_object(item) or (not _is_routine(item) and _is_users_object(item)):
            objects.append(_type_text(type(item), "__qualname__"))


def _is_setting(value: Any) -> bool:
    """A closure value that is a setting, not a cache or counter: numbers, text, sequences, tensors and arrays,
    classes, numpy values and dtypes, torch dtypes and devices, frozen dataclasses (hp42 D13: a dtype, a device or a
    frozen config in a closure resumed silently)."""
    import enum
    import numbers
    import pathlib

    if _is(value, (str, bytes, bytearray, memoryview, int, float, complex, bool, type(None), list, tuple,
                          frozenset, range, slice, numbers.Number, pathlib.PurePath, enum.Enum, torch.Tensor,
                          torch.dtype, torch.device)) or _is_class(value) or _is_builtin(value):
        return True  # (hp43 c03: a Path, a range...; hp46 c36: operator.add, a builtin function, by its name)
    module = _type_text(type(value), "__module__")
    if module == "numpy" or module.startswith("numpy.") or _is_data(value):
        return True
    params = _class_attr(type(value), "__dataclass_params__")  # read statically: no metaclass __getattr__ runs
    return _class_attr(type(value), "__dataclass_fields__") is not _NONE and \
        _type_text(type(params), "__module__") == "dataclasses" and params.frozen is True


def _is_data(value: Any) -> bool:
    """Validation data in a library's container (hp45 c03: a DataLoader, a TensorDataset, a DataFrame, a deque, an
    array.array resumed over other data silently): a setting, digested by what it holds."""
    import array
    import collections
    import datetime
    import re

    if _is(value, (collections.deque, array.array, re.Pattern, datetime.date, datetime.time, datetime.timedelta)):
        return True  # (hp45 c03: a compiled pattern, a date or a duration in a closure resumed silently)
    if _library_state(value) is not _NONE:  # a seed, a random generator, a ufunc, an itemgetter (hp46 c35, c36)
        return True
    module = _type_text(type(value), "__module__")
    return module.split(".")[0] in ("pandas", "datasets") or module.startswith("torch.utils.data")


def _library_state(value: Any) -> Any:
    """What decides a library object's behaviour, read through its own (C) methods on its exact type: a seed sequence's
    entropy, a random generator's state, a ufunc's name, an operator.itemgetter's arguments; _NONE for any other value.
    Their instances have no attributes the digest could read, so two seeds (other validation subsamples) or two
    aggregates (np.maximum, np.minimum) digested alike (hp46 c35, c36)."""
    import operator

    import numpy as np

    kind = type(value)
    try:
        if kind is np.random.SeedSequence:
            return ["SeedSequence", value.entropy, list(value.spawn_key), value.pool_size]
        if kind is np.random.Generator:
            return ["Generator", value.bit_generator.state]
        if kind is np.random.RandomState:
            return ["RandomState", list(value.get_state(legacy=True))]
        if kind is torch.Generator:
            return ["torch.Generator", value.device.type, value.get_state()]
        if kind in (staticmethod, classmethod):  # the function it holds (hp51 d01: two alike)
            return [kind.__name__, kind.__dict__["__func__"].__get__(value, kind)]
        if kind is functools.cached_property:
            return ["cached_property", value.func]
        if kind is torch.jit.ScriptFunction:  # TorchScript: its compiled code (hp51 d01: two scripts alike)
            return ["ScriptFunction", value.qualified_name, value.code]
        if kind is np.ufunc:
            return ["ufunc", value.__name__]
        if kind in (operator.itemgetter, operator.attrgetter, operator.methodcaller):
            return [kind.__name__, list(kind.__reduce__(value)[1])]
    except Exception:  # noqa: BLE001 - a state that cannot be read: counted by the type alone
        return _NONE
    return _NONE


def _qualified(obj: Any) -> str:
    """``module.qualname`` of a function, class or method; of anything else, its class's. Read from the
    interpreter's own slots, never through a user's ``__getattr__`` or a property (hp45 c02)."""
    if _is_method(obj):
        return _qualified(obj.__func__)
    if _is_builtin(obj):  # hp51 d02, d04: torch.Tensor.amax and .amin, float.__neg__ and __pos__ digested alike
        name = getattr(obj, "__qualname__", None)
        return f"{_builtin_module(obj)}.{name if type(name) is str else '?'}"
    if _is_function(obj):
        module = obj.__module__
        name = obj.__qualname__
        if "<lambda>" in name or "<locals>" in name:  # a name that does not say which code: its code does (hp50 k27,
            from .evaluator import code_tag  # k28: two lambdas given to one factory resumed each other's log)

            name = f"{name}#{code_tag(obj.__code__)}"
        return f"{module if type(module) is str else '?'}.{name}"
    cls = obj if _is_class(obj) else type(obj)
    return f"{_type_text(cls, '__module__')}.{_type_text(cls, '__qualname__')}"


def _feed(digest: Any, value: Any, *, depth: int, budget: list[int]) -> None:
    """``value`` into ``digest``, stably across runs (no object addresses), within ``budget`` ([bytes, values] left)
    and ``_MAX_DEPTH``. Never raises: a value that cannot be read counts by its type."""
    if budget[1] <= 0:
        digest.update(b"<more>")
        return
    budget[1] -= 1
    if depth > _MAX_DEPTH:
        digest.update(b"<deep>")
        return
    try:
        _feed_value(digest, value, depth=depth, budget=budget)
        if _is_value_subclass(value):
            # a subclass of a value type with attributes of its own (class Cfg(list) with a .sign, a float subclass
            # whose __slots__ hold one): read them too, the base type's reading leaves them out (hp44 c34, hp45 c32)
            attributes = _instance_dict(value)
            if attributes:
                _feed(digest, attributes, depth=depth + 1, budget=budget)
            for slot in _slots(type(value)):
                held = _slot(value, slot)
                if held is not _NONE:
                    _feed(digest, [slot, held], depth=depth + 1, budget=budget)
    except Exception:  # noqa: BLE001 - a user's type whose own methods raise: counted by its type
        digest.update(b"<unreadable " + _qualified(type(value)).encode("utf-8", "surrogatepass") + b">")


def _is_value_subclass(value: Any) -> bool:
    """An instance of a user's subclass of a type the digest reads by its value (a number, text, bytes, a container,
    a path, a tensor or an array), whose own attributes that reading leaves out."""
    import decimal
    import fractions
    import pathlib

    import numpy as np

    module = _type_text(type(value), "__module__")
    if module == "builtins" or module.split(".")[0] in ("pathlib", "decimal", "fractions", "numpy", "torch", "enum",
                                                        "collections", "array"):
        return False
    import array
    import collections

    return _is(value, (list, tuple, dict, set, frozenset, int, float, complex, str, bytes, bytearray,
                       pathlib.PurePath, decimal.Decimal, fractions.Fraction, torch.Tensor, np.ndarray,
                       collections.deque, array.array))  # (hp46 c04: a deque subclass's .sign)


def _feed_value(digest: Any, value: Any, *, depth: int, budget: list[int]) -> None:
    import numpy as np

    def each(items: Any) -> None:  # at most the values left in the budget, then "<more>"
        for item in itertools.islice(items, budget[1] + 1):
            _feed(digest, item, depth=depth + 1, budget=budget)

    # scalars through their base type's methods: a subclass's __repr__ may raise (hp42 D6), and an int of 5,000
    # digits has no decimal repr under Python's limit (D5): hex has no limit
    if _is(value, bool) or _is(value, np.bool_):
        digest.update(b"b1" if bool(value) else b"b0")
    elif _is(value, int):
        digest.update(b"i" + int.__format__(value, "x").encode() + b"\0")
    elif _is(value, float):
        digest.update(b"f" + float.__repr__(value).encode() + b"\0")
    elif _is(value, complex):
        digest.update(b"c" + complex.__repr__(value).encode() + b"\0")
    elif _is(value, str):
        digest.update(b"s" + str.encode(value, "utf-8", "surrogatepass") + b"\0")
    elif _is(value, memoryview):  # its bytes (a repr names only its address)
        size = value.nbytes
        digest.update(f"m{size}:{value.format}:{value.shape}".encode())
        if size <= budget[0] and value.c_contiguous:
            budget[0] -= size
            digest.update(value.tobytes())
    elif _is(value, (bytes, bytearray)):
        size = len(value)
        digest.update(f"y{size}:".encode())
        if size <= budget[0]:
            budget[0] -= size
            digest.update(bytes(value))
    elif value is None:
        digest.update(b"N")
    elif _is(value, dict):  # dict's own items: a subclass's __getitem__ may raise (hp42 D9)
        pairs = list(itertools.islice(dict.items(value), budget[1] + 1))
        digest.update(b"{")
        for key, item in sorted(pairs, key=lambda pair: _sort_key(pair[0], budget)):
            _feed(digest, key, depth=depth + 1, budget=budget)
            _feed(digest, item, depth=depth + 1, budget=budget)
        digest.update(b"}")
    elif _is(value, (list, tuple)):  # the base type's iterator: a subclass's __iter__ may never end (D8)
        digest.update(b"[")
        each(list.__iter__(value) if _is(value, list) else tuple.__iter__(value))
        digest.update(b"]")
    elif _is(value, (set, frozenset)):
        items = list(itertools.islice(set.__iter__(value) if _is(value, set) else frozenset.__iter__(value),
                                      budget[1] + 1))
        digest.update(b"(")
        each(sorted(items, key=lambda item: _sort_key(item, budget)))
        digest.update(b")")
    elif _is(value, torch.Tensor):
        _feed_tensor(digest, value, depth=depth, budget=budget)
    elif _is(value, np.ma.MaskedArray):
        _feed_object(digest, value, depth=depth, budget=budget)
    elif _is(value, np.ndarray):
        digest.update(f"ndarray{value.shape}{value.dtype.str}".encode())
        if value.dtype == object:  # pandas' .values: the objects themselves (hp41 C68)
            each(value.ravel())
        elif value.nbytes <= budget[0]:
            budget[0] -= value.nbytes
            digest.update(np.ascontiguousarray(value).view(np.uint8).tobytes())
    elif _is(value, np.generic):  # np.int64, np.datetime64, ...: its bytes
        digest.update(f"np{value.dtype.str}:".encode() + np.asarray(value).tobytes())
    elif _is(value, functools.partial) or _is_function(value) or _is_method(value):
        # a partial, function or bound method held in a list or a dict (a list of metrics): by its name and what it
        # was built with, as one held directly (hp45 c74: a partial was read as an object, its arguments left out)
        digest.update(_qualified(value).encode("utf-8", "surrogatepass"))
        _feed(digest, _built_with(value, depth=0, objects=[]), depth=depth + 1, budget=budget)
    elif _is_class(value) or _is_builtin(value):
        digest.update(_qualified(value).encode("utf-8", "surrogatepass"))
        bound = getattr(value, "__self__", None) if _is(value, (types.BuiltinMethodType, types.MethodWrapperType)) \
            else None  # a bound C method: what it is bound to ((2.0).__mul__ and (3.0).__mul__ differ)
        if bound is not None and not (_is_module(bound) or _is_class(bound)):
            _feed(digest, bound, depth=depth + 1, budget=budget)
    elif _is_module(value):
        digest.update(str(value.__name__).encode("utf-8", "surrogatepass"))
    elif _is(value, types.MappingProxyType):  # a class's namespace: its items (a user's Mapping is an object: its
        digest.update(b"{" + _qualified(type(value)).encode())  # items() is its own code, which may never end)
        pairs = list(itertools.islice(types.MappingProxyType.items(value), budget[1] + 1))
        for key, item in sorted(pairs, key=lambda pair: _sort_key(pair[0], budget)):
            _feed(digest, key, depth=depth + 1, budget=budget)
            _feed(digest, item, depth=depth + 1, budget=budget)
        digest.update(b"}")
    else:
        _feed_object(digest, value, depth=depth, budget=budget)


def _feed_object(digest: Any, value: Any, *, depth: int, budget: list[int]) -> None:
    """Any other value by what it holds, never by calling its own methods: a user's __repr__ may never return (hp43
    c02: a search hung before its first candidate), and a default repr holds an address, new every run. Values of
    known types by their parts (a path, a range, a Decimal, a dtype, an enum member); others by their class and their
    instance attributes (``__dict__``, ``__slots__``), read past any ``__getattr__``."""
    import decimal
    import enum
    import fractions
    import pathlib

    import numpy as np

    digest.update(b"<" + _qualified(type(value)).encode("utf-8", "surrogatepass") + b">")
    if _is(value, pathlib.PurePath):
        digest.update(str.encode(pathlib.PurePath.__str__(value), "utf-8", "surrogatepass"))
    elif _is(value, (range, slice)):
        _feed(digest, [value.start, value.stop, value.step], depth=depth + 1, budget=budget)
    elif _is(value, decimal.Decimal):
        _feed(digest, list(decimal.Decimal.as_tuple(value)), depth=depth + 1, budget=budget)
    elif _is(value, fractions.Fraction):  # its slots: a subclass may make numerator a property
        _feed(digest, [_slot(value, "_numerator"), _slot(value, "_denominator")], depth=depth + 1, budget=budget)
    elif _is(value, (torch.dtype, torch.device, np.dtype)):
        digest.update(str(value).encode())  # C types: their str is theirs, and ends
    elif _is(value, enum.Enum):  # its member name, from its own dict (a member may shadow .name)
        _feed(digest, (_instance_dict(value) or {}).get("_name_"), depth=depth + 1, budget=budget)
    elif _is(value, np.ma.MaskedArray):  # its values and its mask (hp45 c03: another mask resumed silently)
        _feed(digest, [np.ndarray.view(value, np.ndarray), np.ma.getmaskarray(value)], depth=depth + 1, budget=budget)
    elif (state := _library_state(value)) is not _NONE:  # read once: a generator's state is a copy
        _feed(digest, state, depth=depth + 1, budget=budget)
    elif _is_data(value):
        _feed_data(digest, value, depth=depth, budget=budget)
    else:
        attributes = _instance_dict(value)
        if attributes is not None:
            _feed(digest, attributes, depth=depth + 1, budget=budget)
        for slot in _slots(type(value)):
            held = _slot(value, slot)
            if held is not _NONE:
                _feed(digest, [slot, held], depth=depth + 1, budget=budget)


def _slot(value: Any, name: str) -> Any:
    """An instance's ``__slots__`` value through its member descriptor (never a property a subclass puts at the same
    name); _NONE where it is unset or no slot."""
    member = _class_attr(type(value), name)
    if type(member) is not types.MemberDescriptorType:
        return _NONE
    try:
        return member.__get__(value, type(value))
    except AttributeError:
        return _NONE


def _feed_data(digest: Any, value: Any, *, depth: int, budget: list[int]) -> None:
    """Validation data in a library's container, by its contents: a deque's items, an array's bytes, a pandas
    object's per-row hashes with its labels and dtypes, a torch Dataset's attributes (a TensorDataset's tensors), a
    DataLoader's dataset and batching (not its iterator, which changes as it is used)."""
    import array
    import collections
    import datetime
    import re

    if _is(value, re.Pattern):  # a final type: its own pattern and flags
        _feed(digest, [value.pattern, value.flags], depth=depth + 1, budget=budget)
    elif _is(value, (datetime.date, datetime.time, datetime.timedelta)):  # the C type's own state, never a subclass's
        kind = next(k for k in (datetime.datetime, datetime.date, datetime.time, datetime.timedelta) if _is(value, k))
        _feed(digest, list(kind.__reduce__(value)[1]), depth=depth + 1, budget=budget)
    elif _is(value, collections.deque):
        _feed(digest, list(itertools.islice(collections.deque.__iter__(value), budget[1] + 1)), depth=depth + 1,
              budget=budget)
    elif _is(value, array.array):
        data = array.array.tobytes(value)
        digest.update(f"array{array.array.__dict__['typecode'].__get__(value)}{len(data)}".encode())
        if len(data) <= budget[0]:
            budget[0] -= len(data)
            digest.update(data)
    elif _type_text(type(value), "__module__").split(".")[0] == "pandas":
        import pandas as pd

        try:
            settings = dict(getattr(value, "attrs", None) or {})  # DataFrame.attrs: metadata a user sets (hp46 c04)
            labels = [str(c) for c in getattr(value, "columns", [])][:budget[1]]
            kinds = [str(d) for d in getattr(value, "dtypes", [])][:budget[1]] if hasattr(value, "columns") else \
                [str(getattr(value, "dtype", ""))]
            try:
                hashed: Any = pd.util.hash_pandas_object(value, index=True).to_numpy()
            except (TypeError, ValueError):  # lists or dicts in its cells (choices per row), a Categorical: each
                # value as it is, within the budget (hp46 c50: digested by its class only)
                import numpy as np

                hashed = [np.asarray(value, dtype=object), np.asarray(getattr(value, "index", []), dtype=object)]
        except Exception:  # noqa: BLE001 - an object pandas cannot read so: by its class
            return
        _feed(digest, [hashed, labels, kinds, settings], depth=depth + 1, budget=budget)
    elif _type_text(type(value), "__module__").startswith("torch.utils.data") and \
            _type_text(type(value), "__name__") == "DataLoader":
        attributes = _instance_dict(value) or {}
        _feed(digest, [attributes.get(k) for k in ("dataset", "batch_size", "drop_last", "collate_fn", "sampler",
                                                   "batch_sampler")],  # (hp46 c04: a BatchSampler's indices)
              depth=depth + 1, budget=budget)
    else:
        attributes = _instance_dict(value)
        if attributes is not None:
            _feed(digest, attributes, depth=depth + 1, budget=budget)


def _feed_tensor(digest: Any, value: torch.Tensor, *, depth: int, budget: list[int]) -> None:
    """A tensor by its shape, dtype and layout, and its values' bytes within the budget: a view of another tensor
    (conjugate, negative), a subclass, a quantized, sparse or nested tensor too (hp42 D7, D12: a sparse tensor
    counted by its shape only, so other values resumed); a meta tensor has no values."""
    with torch._C.DisableTorchFunctionSubclass():  # a subclass's __torch_function__ may never return (hp43 c25)
        tensor = (value if type(value) is torch.Tensor else torch.Tensor.as_subclass(value, torch.Tensor)).detach()
    digest.update(f"tensor{tuple(tensor.shape) if not tensor.is_nested else 'nested'}{tensor.dtype}"
                  f"{tensor.layout}".encode())
    if tensor.device.type == "meta":
        return
    if tensor.is_nested:
        for part in itertools.islice(tensor.unbind(), budget[1] + 1):
            _feed(digest, part, depth=depth + 1, budget=budget)
        return
    if tensor.layout != torch.strided:  # sparse: its coordinates and values
        coo = tensor.to_sparse_coo() if tensor.layout != torch.sparse_coo else tensor
        coo = coo.coalesce()
        _feed(digest, coo.indices(), depth=depth + 1, budget=budget)
        _feed(digest, coo.values(), depth=depth + 1, budget=budget)
        return
    if tensor.is_quantized:
        digest.update(f"q{tensor.qscheme()}".encode())
        if tensor.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            digest.update(f"{tensor.q_scale()!r}/{tensor.q_zero_point()}".encode())
        else:
            _feed(digest, tensor.q_per_channel_scales(), depth=depth + 1, budget=budget)
            _feed(digest, tensor.q_per_channel_zero_points(), depth=depth + 1, budget=budget)
        tensor = tensor.int_repr()
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes > budget[0]:
        return
    budget[0] -= nbytes
    flat = tensor.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    digest.update(flat.view(torch.uint8).numpy().tobytes() if nbytes else b"")  # any dtype: its bytes


def _sort_key(value: Any, budget: list[int]) -> str:
    """A stable order for a set's items or a dict's keys: their type and a small digest of each, never their repr
    (which may raise, or never return). The values it visits count against the digest's ``budget`` too (hp45 c04:
    300,000 keys, each with 256 values of its own, took minutes)."""
    key = hashlib.sha256()
    own = [min(1 << 16, max(budget[0], 0)), min(1 << 8, max(budget[1], 1))]
    spent = own[1]
    _feed(key, value, depth=0, budget=own)  # its whole depth (hp46 c15: items alike to depth 2 tied, and a set kept
    # its hash-randomized order, so the digest changed from run to run)
    budget[1] -= spent - own[1]
    return f"{_type_text(type(value), '__qualname__')}:{key.hexdigest()}"
