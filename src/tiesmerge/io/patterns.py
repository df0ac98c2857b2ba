"""PEFT's ``alpha_pattern`` / ``rank_pattern`` keys (and adapter selectors), matched without runaway backtracking.

PEFT reads each key as a regular expression that a module name must end with
(``re.match(rf"(.*\\.)?({key})$", module)``). An adapter config comes from whoever trained the
adapter, and a key like ``(a+)+$`` makes a backtracking engine take exponential time. So the
pattern is parsed with Python's own regex parser (same syntax, same errors) and run as a
Thompson automaton over the module name: time linear in the name for any pattern. Features that
need backtracking (backreferences, lookarounds) and flags are refused with a typed error. An
adapter's patterns carry a :class:`MatchClock` (one time budget per field over all its modules);
they run on the ``regex`` package, in C with a time limit per module, where it is installed (the
automaton runs in Python: 50 µs a path even for ``.*\\.(q|v)_proj``).

>>> ModulePattern.compile("q_proj|v_proj", "adapter_config.json").matches("model.layers.0.self_attn.q_proj")
True
"""

from __future__ import annotations

import re
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, TiesMergeError

try:  # Python 3.11+: the parser moved under re
    from re import _parser as _sre  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre  # type: ignore[no-redef]

__all__ = ["ModulePattern", "PatternTable", "MatchClock", "boundary_suffixes", "read_alike", "classes_read_alike",
           "MAX_PATTERN_CHARS", "MAX_NESTING", "MAX_STATES", "TOTAL_SECONDS", "MATCH_SECONDS"]

MAX_PATTERN_CHARS = 1000  # real keys are module paths of a few dozen characters
MAX_NESTING = 50  # groups inside groups: re's parser (and the automaton's builder) recurse once per level
# automaton size, after {m,n} repeats are expanded: matching runs in Python, 0.1-0.2 µs per live state and character
# of a name (a 3,208-state key: 26 ms on a 49-character name; 7,208 states: 41 ms, and 1,000 such keys took 105 s:
# hostile pass 26, F6); keys re runs in linear time (module paths, lists of them) do not count (ModulePattern.plain)
MAX_STATES = 5_000
# one field's patterns (a selector, a layers_pattern list, a pattern table) over all of an adapter's modules: real
# ones take milliseconds (3,000 matches of 40 ms each took 31 s: hp27 F5; 4,803 states on 4,000-character paths,
# 5 min: hp28 F5)
TOTAL_SECONDS = 2.0
MATCH_SECONDS = 0.05  # one module path against one pattern on a backtracking engine: microseconds unless it never ends


class MatchClock:
    """The time one field's patterns have spent matching an adapter's module paths, against
    :data:`TOTAL_SECONDS`: past it, an error naming the field (PEFT, matching with ``re``, would spend as long
    or hang), not minutes of matching."""

    def __init__(self, what: str, hint: str, *, names: str = "the adapter's module paths", one: str = "the module",
                 error: type[TiesMergeError] = CheckpointError,
                 elsewhere: str = "PEFT would spend as long loading it", hang: str = " (PEFT would hang on it too)"
                 ) -> None:
        """``names``/``one``: what is matched, said in the errors (an option's pattern: the model's tensor names);
        ``error``: the error raised past the budget; ``elsewhere``: what another tool would do with the pattern."""
        self.what, self.hint = what, hint
        self.names, self.one, self.error, self.elsewhere, self.hang = names, one, error, elsewhere, hang
        # each thread its own budget: a compiled pattern is shared by a process's merges, and two merges in two
        # threads charged one budget between them (hp50 c06: one refused for the other's time)
        self._local = threading.local()

    @property
    def spent(self) -> float:
        return getattr(self._local, "spent", 0.0)

    @spent.setter
    def spent(self, seconds: float) -> None:
        self._local.spent = seconds

    def __getstate__(self) -> dict[str, Any]:  # a thread-local does not pickle (a pattern sent to a worker)
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def charge(self, seconds: float) -> None:
        self.spent += seconds
        if self.spent > TOTAL_SECONDS:
            raise self.error(f"{self.what} took more than {TOTAL_SECONDS:g} s to match {self.names} (a regex that "
                             f"is slow on each; {self.elsewhere})", hint=self.hint)

    def run(self, match: Callable[..., Any], module: str) -> Any:
        """``match(module)`` of a ``regex``-package pattern, under :data:`MATCH_SECONDS`, charged to the clock."""
        start = time.perf_counter()
        try:
            found = match(module, timeout=MATCH_SECONDS)
        except TimeoutError:
            raise self.error(f"{self.what} takes more than {MATCH_SECONDS:g} s to match {self.one} {module[:200]!r}: "
                             f"a regex that backtracks without end{self.hang}", hint=self.hint) from None
        self.charge(time.perf_counter() - start)
        return found

_CATEGORIES: dict[object, Callable[[str], bool]] = {}
for _name, _test in (("DIGIT", str.isdecimal), ("SPACE", str.isspace), ("WORD", lambda c: c.isalnum() or c == "_"),
                     ("LINEBREAK", lambda c: c == "\n")):
    for _prefix in ("", "UNI_", "LOC_"):
        if hasattr(_sre, f"CATEGORY_{_prefix}{_name}"):
            _CATEGORIES[getattr(_sre, f"CATEGORY_{_prefix}{_name}")] = _test
            _CATEGORIES[getattr(_sre, f"CATEGORY_{_prefix}NOT_{_name}")] = (lambda t: lambda c: not t(c))(_test)


_PLAIN_OPS = (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN)  # one character each: nothing repeats


def _linear(items: list, branches: int = 1) -> bool:
    """Whether ``re`` runs a key in time linear in the name: single characters, and at most one alternation of
    such sequences (a list of module paths, its common prefix factored out by re's parser), in groups or not; no
    repeat anywhere, and no second alternation (alternations in sequence or nested multiply the paths a
    backtracking engine tries)."""
    for op, av in items:
        if op in _PLAIN_OPS:
            continue
        if op is _sre.SUBPATTERN:
            if av[1] or av[2] or not _linear(list(av[-1]), branches):  # scoped flags ((?i:...)): refused as (?i) is,
                return False  # by the automaton below, wherever they stand (hostile pass 27, N1)
            branches -= _alternations(list(av[-1]))
        elif op is _sre.BRANCH and branches > 0:
            if not all(all(o in _PLAIN_OPS for o, _ in branch) for branch in av[1]):
                return False
            branches -= 1
        else:
            return False
        if branches < 0:
            return False
    return True


def _alternations(items: list) -> int:
    return sum(1 if op is _sre.BRANCH else _alternations(list(av[-1])) if op is _sre.SUBPATTERN else 0
               for op, av in items)


class _Refused(Exception):
    """A pattern feature the automaton does not run (it needs backtracking)."""


def _char_test(op: object, av: object) -> Callable[[str], bool]:
    if op is _sre.LITERAL:
        return chr(av).__eq__  # type: ignore[arg-type]
    if op is _sre.NOT_LITERAL:
        return chr(av).__ne__  # type: ignore[arg-type]
    if op is _sre.ANY:
        return lambda c: c != "\n"
    if op is _sre.IN:
        items = list(av)  # type: ignore[call-overload]
        negate = bool(items) and items[0][0] is _sre.NEGATE
        tests = [_set_item(o, a) for o, a in (items[1:] if negate else items)]
        return lambda c: any(t(c) for t in tests) != negate
    raise _Refused(f"{op}: backreferences and lookarounds need backtracking")


def _set_item(op: object, av: object) -> Callable[[str], bool]:
    if op is _sre.LITERAL:
        return chr(av).__eq__  # type: ignore[arg-type]
    if op is _sre.RANGE:
        lo, hi = av  # type: ignore[misc]
        return lambda c: lo <= ord(c) <= hi
    if op is _sre.CATEGORY and av in _CATEGORIES:
        return _CATEGORIES[av]
    raise _Refused(f"{op} {av} in a character set")


def _backreference(key: str) -> str | None:
    """The first backreference in a regex (``\\1``, ``(?P=name)``, ``(?(1)...)``), or None; escapes
    and character classes are skipped (``[\\1]`` is the character 1's octal escape, not a reference)."""
    i, in_class = 0, False
    while i < len(key):
        c = key[i]
        if c == "\\":
            nxt = key[i + 1:i + 2]
            if not in_class and nxt.isdigit() and nxt != "0":
                return key[i:i + 3] if key[i + 2:i + 3].isdigit() else key[i:i + 2]
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if key[i + 1:i + 2] == "^":
                i += 1
            if key[i + 1:i + 2] == "]":  # a leading ] is a character of the class
                i += 1
        elif key.startswith("(?P=", i):
            return key[i:key.find(")", i) + 1] or key[i:]
        elif key.startswith("(?(", i):
            return key[i:key.find(")", i) + 1] or key[i:]
        i += 1
    return None


@dataclass
class _State:
    kind: str  # "char", "split", "end" ($), "begin" (^), "match"
    test: Callable[[str], bool] | None = None
    out: list[int] | None = None


class _Builder:
    """Thompson's construction, back to front: ``build(seq, next)`` returns the start state."""

    def __init__(self) -> None:
        self.states: list[_State] = [_State("match")]

    def add(self, state: _State) -> int:
        if len(self.states) >= MAX_STATES:
            raise _Refused(f"repeat counts too large: more than {MAX_STATES} automaton states")
        self.states.append(state)
        return len(self.states) - 1

    def build(self, seq: list, nxt: int) -> int:
        for op, av in reversed(list(seq)):
            nxt = self.item(op, av, nxt)
        return nxt

    def item(self, op: object, av: object, nxt: int) -> int:
        if op is _sre.SUBPATTERN:
            group, add_flags, del_flags, sub = av  # type: ignore[misc]
            if add_flags or del_flags:
                raise _Refused("inline flags such as (?i:...): matching is case-sensitive, as tensor names are")
            return self.build(sub, nxt)
        if op is _sre.BRANCH:
            starts = [self.build(alt, nxt) for alt in av[1]]  # type: ignore[index]
            return self.add(_State("split", out=starts))
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None)):
            low, high, sub = av  # type: ignore[misc]
            if high == _sre.MAXREPEAT:  # sub{low,}: a loop after low copies
                loop = self.add(_State("split"))
                self.states[loop].out = [self.build(sub, loop), nxt]
                tail = loop
            else:  # sub{low,high}: high - low optional copies
                tail = nxt
                for _ in range(high - low):
                    tail = self.add(_State("split", out=[self.build(sub, tail), nxt]))
            for _ in range(low):
                tail = self.build(sub, tail)
            return tail
        if op is _sre.AT:
            if av in (_sre.AT_END, _sre.AT_END_STRING):
                return self.add(_State("end", out=[nxt]))
            if av in (_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING):
                return self.add(_State("begin", out=[nxt]))
            raise _Refused(f"the anchor {av}")
        return self.add(_State("char", test=_char_test(op, av), out=[nxt]))


def _nesting(key: str) -> int:
    """The deepest nesting of parentheses in a regex, not counting escaped ones or those inside [...]."""
    depth = deepest = 0
    escaped = in_class = False
    for i, ch in enumerate(key):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = not (ch == "]" and key[i - 1] != "[" and key[i - 2:i] != "[^")
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth = max(0, depth - 1)
    return deepest


@dataclass(frozen=True)
class ModulePattern:
    """One pattern key, compiled to an automaton that matches PEFT's ``(.*\\.)?(key)$``."""

    key: str
    states: tuple[_State, ...]
    start: int
    anywhere: bool = False  # re.search's rule (a match anywhere in the name) instead of PEFT's
    # a key without repeats and with at most one alternation of plain sequences (a module path, a list of them: see
    # _linear): re runs it, in C, with nothing to backtrack but the wrapper's own prefix, in time linear in the name
    # (the automaton, in Python, took 41 ms a name for a 7,000-state key: hostile pass 26, F6); no states then
    plain: re.Pattern[str] | None = None
    clock: MatchClock | None = field(default=None, compare=False, repr=False)  # the matching's time budget
    # under a clock (an adapter's patterns), the same expression on the regex package (in C, under MATCH_SECONDS a
    # path): the automaton runs in Python, 50 µs a path for `.*\.(q|v)_proj`, seconds for a large adapter's modules
    fast: Any = field(default=None, compare=False, repr=False)
    # names already searched (search()): a merge asks per tensor, a search per candidate, each answered once
    found: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def compile(cls, key: object, source: str, *, anywhere: bool = False, whole: bool = False,
                max_chars: int = MAX_PATTERN_CHARS, clock: MatchClock | None = None) -> ModulePattern:
        """``anywhere``: match like ``re.search(key, name)`` (the SVD methods' ``exclude``); ``whole``: like
        ``re.fullmatch(key, name)`` (PEFT's ``target_modules`` given as one string). ``clock``: the time budget the
        automaton shares with the field's other patterns (an adapter's; none for the user's own options)."""
        if not isinstance(key, str) or not key or len(key) > max_chars:
            raise CheckpointError(f"{source}: pattern key {str(key)[:80]!r} is not a module name pattern "
                                  f"(a non-empty string of at most {max_chars:,} characters)")
        what = ("exclude patterns are regexes searched in each tensor name" if anywhere else
                "target_modules, exclude_modules and layers_pattern strings are regexes (Python's syntax) that PEFT "
                "matches against whole module names" if whole else
                "alpha_pattern and rank_pattern keys are regexes a module name ends with")
        depth = _nesting(key)
        if depth > MAX_NESTING:  # re's parser would raise RecursionError a few hundred levels down
            raise CheckpointError(f"{source}: pattern key {key[:80]!r} nests groups {depth} deep; at most "
                                  f"{MAX_NESTING} levels are accepted",
                                  hint=f"{what}: write it with fewer nested parentheses")
        refers = _backreference(key)
        if refers:  # refused before re's own message ("cannot refer to an open group") says something else
            raise CheckpointError(f"{source}: pattern key {key[:80]!r} uses a backreference ({refers}); "
                                  "backreferences are not supported (matching them needs backtracking)",
                                  hint=f"{what}: write it without backreferences (| . * + ? [] {{m,n}})")
        try:
            with warnings.catch_warnings():  # re's "Possible nested set" ([[:alpha:]]): re's reading is what PEFT runs
                warnings.simplefilter("ignore", FutureWarning)
                re.compile(key)
                own = _sre.parse(key)  # the user's text alone (parsed once: flags, then whether re runs it linearly)
                if own.state.flags & ~_sre.SRE_FLAG_UNICODE:  # the user's own text: wrapped, (?i) would move
                    raise _Refused("inline flags such as (?i): matching is case-sensitive, as tensor names are")
                parsed = _sre.parse(rf"[\s\S]*({key})" if anywhere else rf"({key})$" if whole else
                                    rf"(.*\.)?({key})$")
                if parsed.state.flags & ~(_sre.SRE_FLAG_UNICODE):
                    raise _Refused("inline flags")
                if _linear(own.data):  # re runs it in linear time: no automaton (and no size limit on it)
                    wrapped = rf"(?:{key})" if anywhere else rf"(?:{key})\Z" if whole else rf"(.*\.)?(?:{key})\Z"
                    return cls(key, (), 0, anywhere, re.compile(wrapped))
                builder = _Builder()
                start = builder.build(parsed, 0)
        except (re.error, OverflowError) as exc:  # a repeat count of 2**32 or more: OverflowError (hp58 c32, c33)
            raise CheckpointError(f"{source}: pattern key {key[:80]!r} is not a valid regular expression ({exc})",
                                  hint=what) from None
        except RecursionError:  # a structure nested deeper than the depth check sees (it counts parentheses only)
            raise CheckpointError(f"{source}: pattern key {key[:80]!r} is nested too deeply to compile",
                                  hint=f"{what}: write it with fewer nested groups and repetitions") from None
        except _Refused as exc:
            raise CheckpointError(f"{source}: pattern key {key[:80]!r} uses a feature tiesmerge does not run "
                                  f"({exc})",
                                  hint="write the key as a module name or a plain regex (| . * + ? [] {m,n})"
                                  ) from None
        wrapped = rf"(?:{key})" if anywhere else rf"(?:{key})\Z" if whole else rf"(.*\.)?(?:{key})\Z"
        return cls(key, tuple(builder.states), start, anywhere, clock=clock,
                   fast=_on_regex_package(wrapped) if clock is not None and read_alike(key) else None)

    def _closure(self, states: set[int], pos: int, end: int) -> set[int]:
        seen, todo = set(), list(states)
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            st = self.states[s]
            if st.kind == "split":
                todo.extend(st.out or ())
            elif (st.kind == "end" and pos == end) or (st.kind == "begin" and pos == 0):
                todo.extend(st.out or ())
        return seen

    def matches(self, module: str) -> bool:
        """Whether ``module`` ends with a match of the key at a ``.`` boundary (PEFT's rule)."""
        if self.plain is not None:
            return (self.plain.search(module) if self.anywhere else self.plain.match(module)) is not None
        # the regex package's \w, \b, \d, \s take some non-ASCII characters otherwise than re (a combining accent is a
        # word character to it, not to re: hostile pass 32, C23); the automaton reads them as re does
        if self.fast is not None and self.clock is not None and module.isascii():
            return self.clock.run(self.fast.search if self.anywhere else self.fast.match, module) is not None
        last = time.perf_counter()
        found: bool | None = None
        current = self._closure({self.start}, 0, len(module))
        for pos, c in enumerate(module):
            if self.anywhere and 0 in current:
                found = True
                break
            step = {st.out[0] for s in current if (st := self.states[s]).kind == "char" and st.test(c)}  # type: ignore
            if not step:
                found = False
                break
            current = self._closure(step, pos + 1, len(module))
            if pos & 63 == 63 and self.clock is not None:  # thousands of live states on a long path: seconds a path
                now = time.perf_counter()
                self.clock.charge(now - last)
                last = now
        if self.clock is not None:
            self.clock.charge(time.perf_counter() - last)
        return (0 in current) if found is None else found

    def search(self, name: str) -> bool:
        """Same as :meth:`matches`: lets a pattern stand where a compiled ``re`` pattern's search is called. Each
        name is matched once (hp48 c41: an option's pattern matched again per tensor, merge and search alike)."""
        hit = self.found.get(name)
        if hit is None:
            hit = self.matches(name)
            if len(self.found) < 1_000_000:
                self.found[name] = hit
        return hit


MAX_TABLE_KEYS = 100_000  # alpha_pattern / rank_pattern keys: a model has some thousands of modules at most
MAX_REGEX_KEYS = 1_000  # keys that are regexes proper (not module names): each is tried against every module
MAX_SHAPES = 1_000  # module-name keys' shapes (their parts' lengths): each is a lookup per module


# what the regex package reads otherwise than Python's re (PEFT matches with re): a POSIX class [[:alpha:]] (re: the
# set {'[', ':', 'a', ...} then a literal ']'), and braces holding more than a count, fuzzy matching there
# ((?:ab){e<=1}; re: literal text). Such keys run on the automaton, built from re's own parse (hostile pass 31, C81).
_READ_OTHERWISE = re.compile(r"\[:|\{[^}]*[^\d,}]")


# escapes whose characters the regex package and re decide otherwise on non-ASCII text (Unicode's word, digit and
# space properties against str.isalnum, isdecimal, isspace)
_CLASS_ESCAPES = re.compile(r"\\[wWbBdDsS]")


def classes_read_alike(key: str, text: str) -> bool:
    """Whether the regex package matches ``key`` against ``text`` as re does as far as character classes go:
    always on ASCII text, and on any text for a key without class escapes."""
    return text.isascii() or _CLASS_ESCAPES.search(key) is None


def read_alike(key: str) -> bool:
    """Whether the regex package reads ``key`` as Python's re does (see :data:`_READ_OTHERWISE`)."""
    return _READ_OTHERWISE.search(key) is None


def _on_regex_package(expression: str) -> Any:
    """``expression`` compiled by the regex package (matches with a timeout), or None where it cannot be."""
    try:
        import regex
    except ImportError:  # pragma: no cover - transformers (and PEFT) depend on it
        return None
    try:
        return regex.compile(expression)
    except (regex.error, RecursionError, OverflowError):
        return None


def boundary_suffixes(module: str) -> list[str]:
    """``a.b.c`` -> ["a.b.c", "b.c", "c"]: the tails of a module path that start at a component."""
    out, at = [module], module.find(".")
    while at >= 0:
        out.append(module[at + 1:])
        at = module.find(".", at + 1)
    return out


class PatternTable:
    """PEFT's ``alpha_pattern`` / ``rank_pattern``: the value of the first key (in the table's order) that a module
    path ends with, ``re.match(rf"(.*\\.)?({key})$", module)``. A key that is a module name or path (letters,
    digits, '_' and '.') is indexed, not tried against every module, so a table listing every module of a large
    model costs a few lookups a module (100,000 keys took 16 s to compile one by one and 74 s to match: hostile
    pass 27, F3); its '.' still matches any character, as in the regex, through an index by the name's shape.
    Other keys run on :class:`ModulePattern` (at most :data:`MAX_REGEX_KEYS`, sharing :data:`MAX_STATES`)."""

    def __init__(self, table: dict, field: str, source: str, value: Callable[[object, str], float]) -> None:
        if len(table) > MAX_TABLE_KEYS:
            raise CheckpointError(f"{source}: {field} has {len(table):,} keys; at most {MAX_TABLE_KEYS:,} are read "
                                  "(a model has some thousands of modules)",
                                  hint=f"write {field} with fewer keys (one per module at most)")
        self._clock = MatchClock(f"{source}: {field}", f"write {field}'s keys as module names (a name or a path "
                                                       "matches itself) or short regexes")
        # shape (the lengths of the key's '.'-separated parts) -> {the parts: (position, value)}
        shapes: dict[tuple[int, ...], dict[tuple[str, ...], tuple[int, float]]] = {}
        self._regexes: list[tuple[int, ModulePattern, float]] = []
        states = 0
        for position, (key, raw) in enumerate(table.items()):
            number = value(raw, f"{field}[{str(key)[:80]!r}]")
            if isinstance(key, str) and key and len(key) <= MAX_PATTERN_CHARS and _NAME.fullmatch(key):
                parts = tuple(key.split("."))
                shapes.setdefault(tuple(map(len, parts)), {}).setdefault(parts, (position, number))
                continue
            pattern = ModulePattern.compile(key, f"{source}: {field}", clock=self._clock)
            states += len(pattern.states)  # module paths take none (re runs them); repeats do
            if len(self._regexes) >= MAX_REGEX_KEYS or states > MAX_STATES:
                raise CheckpointError(f"{source}: {field} holds more regex keys than tiesmerge runs for one adapter "
                                      f"(at most {MAX_REGEX_KEYS:,} keys and {MAX_STATES:,} automaton states in all; "
                                      "1,000 keys of 7,000 states took 105 s)",
                                      hint=f"write {field}'s keys as module names (a name or a path matches itself)"
                                           " or short regexes")
            self._regexes.append((position, pattern, number))
        if len(shapes) > MAX_SHAPES:  # each is a lookup per module (100,000 shapes took minutes: hostile pass 28, F1)
            raise CheckpointError(f"{source}: {field}'s module-name keys come in {len(shapes):,} shapes (lengths of "
                                  f"their '.'-separated parts); at most {MAX_SHAPES:,} are read (the module paths of a "
                                  "model come in some dozens)", hint=f"write {field} with the model's module names")
        # a tail's length -> [(the key's '.' positions as bits, its shape, its keys)]: only keys as long as the tail,
        # with a '.' wherever the tail has one, can match it ('.' in a key matches any character, as in the regex)
        self._named: dict[int, list[tuple[int, tuple[int, ...], dict[tuple[str, ...], tuple[int, float]]]]] = {}
        for shape, keys in shapes.items():
            dots, at = 0, -1
            for n in shape[:-1]:
                at += n + 1
                dots |= 1 << at
            self._named.setdefault(sum(shape) + len(shape) - 1, []).append((dots, shape, keys))

    def lookup(self, module: str) -> float | None:
        """The value of the first key ``module`` ends with, or None where none does."""
        start = time.perf_counter()
        best: tuple[int, float] | None = None
        module_dots, at = 0, module.find(".")
        while at >= 0:
            module_dots |= 1 << at
            at = module.find(".", at + 1)
        for tail in boundary_suffixes(module):
            for dots, shape, keys in self._named.get(len(tail), ()):
                tail_dots = module_dots >> (len(module) - len(tail))
                if dots & tail_dots != tail_dots:  # the tail has a '.' where the key has a name character
                    continue
                at, parts = 0, []
                for n in shape:  # the tail cut where the key has its '.', which matches any character there
                    parts.append(tail[at:at + n])
                    at += n + 1
                hit = keys.get(tuple(parts))
                if hit is not None and (best is None or hit[0] < best[0]):
                    best = hit
        self._clock.charge(time.perf_counter() - start)
        for position, pattern, number in self._regexes:
            if best is not None and position > best[0]:
                break
            if pattern.matches(module):
                best = (position, number)
                break
        return None if best is None else best[1]


_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")  # a module name or path: indexed by its parts
