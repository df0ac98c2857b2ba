"""Which modules a PEFT adapter config adapts, decided as PEFT 0.21 decides when it loads the adapter.

PEFT creates adapter layers only on the modules its config selects (``check_target_module_exists``) and puts
saved whole modules only where ``modules_to_save`` names them (``_set_trainable``); every other tensor in the
adapter file is dropped as an unexpected key. Merging such a tensor merges an adapter that nobody runs (hostile
passes 24 and 25), so :func:`check_adapted` refuses it. The rules, in PEFT's order:

- ``exclude_modules``: a string is a regex the whole module path matches; a list names a path or its last
  components. An excluded module is not adapted.
- ``modules_to_save`` (with the task type's head, ``classifier``/``score`` or ``qa_outputs``, which PEFT adds when
  it loads the adapter): a module at or inside one of them is trained whole, never adapted.
- ``target_modules``: a string is a regex the whole path matches (``layers_to_transform`` then plays no part); a
  list selects a module it names whole, or whose path ends with ``.<entry>``, and only then does
  ``layers_to_transform`` (an index or a non-empty list) test the module's layer: the first ``<list>.<N>.`` of its
  path (``layers_pattern`` entries, regexes tried in order, name the list; without them any list after the first
  component).

No regex from the config runs on Python's backtracking ``re`` unless ``re`` runs it in linear time (module paths,
one alternation of them): an adapter config is a stranger's file. ``target_modules`` / ``exclude_modules`` are
checked by :class:`~tiesmerge.io.patterns.ModulePattern` (its refusals: backreferences, flags, automata past
``MAX_STATES``) and run on the ``regex`` package (transformers' dependency: in C, a time limit per module);
``layers_pattern`` and ``modules_to_save`` regexes run as PEFT's own expressions (each entry pasted in as text, as
PEFT does) the same way, so PEFT's quirks (a top-level ``|`` splitting its expression) are reproduced, not guessed.
A selector the automaton cannot run but ``re`` compiles (a lookahead, as in ``^(?!.*vision).*q_proj``) runs there
too. Each field's patterns share one time budget over all of the adapter's modules (``patterns.MatchClock``: a
regex slow on every module is an error naming the field, not minutes). Where the ``regex`` package is not installed
(the automaton then runs, in Python), or a selector is longer than :data:`MAX_SELECTOR_CHARS` or repeats past
:data:`MAX_EXPANSION`, it is not checked, and that is said.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, IncompatibleCheckpointsError, MergeWarning
from ..unicode_names import apart, non_ascii_note, normalization_twin
from .patterns import MatchClock, ModulePattern, boundary_suffixes, classes_read_alike, read_alike

try:  # Python 3.11+: the parser moved under re
    from re import _parser as _sre  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre  # type: ignore[no-redef]

__all__ = ["Targeting", "check_adapted", "feedforward", "conv1d_layout", "base_model_types",
           "warn_layout_unknown", "MAX_SELECTOR_CHARS"]

# a regex listing every adapted module path of a 32-layer model runs to some 8,000 characters; past this bound a
# selector is not checked (re.compile of a 28 MB one took a minute and 3.7 GB: hostile pass 25, F7)
MAX_SELECTOR_CHARS = 20_000
# the heads PEFT adds to modules_to_save for a task type when it loads the adapter (PeftModelFor<Task>.__init__)
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}
_MAX_INDEX_DIGITS = 9  # a longer "layer index" is no layer any list holds (and int() of 5000 digits fails)
MAX_MODULE_CHARS = 4096  # a module path: real ones run to a few hundred characters
MAX_COMPONENTS = 256  # and a few dozen components
MAX_EXPANSION = 100_000  # a selector's size with its repeat counts multiplied out: a real one is a few hundred
# module names all-linear never adapts: the output layers PEFT leaves out by name of the model's output embeddings
# (Llama's lm_head, GPT-NeoX's embed_out) and the embeddings, which are no Linear layers
_NOT_ALL_LINEAR = frozenset({"lm_head", "embed_out", "embed_tokens", "wte", "wpe", "word_embeddings", "shared",
                             "embed_in", "position_embeddings", "token_type_embeddings"})
MAX_SPANS = 8  # modules_to_save names compared as names: this many different numbers of components at most


def _clock(field: str, source: str) -> MatchClock:
    """The time budget of one field's patterns over the adapter's modules (patterns.TOTAL_SECONDS)."""
    return MatchClock(f"{source}: {field}", f"fix {field} in the adapter config (a list of module names, or a plain "
                                            "regex)")


class _TimedRegex:
    """A selector with lookarounds, matched by the ``regex`` package under a time limit (a pattern that backtracks
    without end is an error naming it, not a hang); the field's entries share one clock."""

    def __init__(self, compiled: object, clock: MatchClock) -> None:
        self.compiled, self.clock = compiled, clock

    def matches(self, module: str) -> bool:
        return self.match(module, whole=True) is not None

    def match(self, module: str, *, whole: bool = False) -> Any:
        """``fullmatch`` (``whole``) or ``match`` at the start, as PEFT calls re."""
        if not classes_read_alike(self.compiled.pattern, module):  # type: ignore[attr-defined]
            # a non-ASCII path and \w-like classes (hostile pass 32, C23): the regex package reads them otherwise than
            # PEFT's re, and re itself has no time limit (a lookaround selector may backtrack without end)
            raise CheckpointError(f"{self.clock.what}: a selector with lookarounds and character classes (\\w, \\d, "
                                  f"\\s, \\b) on the module path {module[:120]!r}, which holds non-ASCII characters: "
                                  "tiesmerge cannot match it as PEFT's re does within a time bound",
                                  hint=self.clock.hint)
        return self.clock.run(self.compiled.fullmatch if whole else self.compiled.match, module)  # type: ignore


class _Literal(str):
    """A long target_modules string without a regex metacharacter: PEFT's re.fullmatch of it is equality."""

    def matches(self, module: str) -> bool:
        return module == self


Selector = ModulePattern | _TimedRegex | _Literal | frozenset[str]


class _Unchecked(Exception):
    """A selector the automaton cannot run: the modules it selects are not known."""


def _selector(value: object, field: str, source: str) -> Selector | None:
    """``target_modules`` or ``exclude_modules`` as PEFT reads it; None where it is not given."""
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, str):
        try:
            return ModulePattern.compile(value, f"{source}: {field}", whole=True, max_chars=MAX_SELECTOR_CHARS,
                                         clock=_clock(field, source))
        except CheckpointError:
            if len(value) > MAX_SELECTOR_CHARS and re.escape(value) == value:  # no metacharacter: PEFT's fullmatch
                return _Literal(value)  # of a literal is equality, checked in linear time (hp42 C25)
            if len(value) > MAX_SELECTOR_CHARS:  # PEFT may load it: it is only not checked
                raise _Unchecked(field) from None
            if not _compiles(value):
                raise  # an invalid regex: PEFT could not load the adapter either; the error names it
            timed = _timed(value, field, source)
            if timed is None:
                raise _Unchecked(field) from None
            return timed
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CheckpointError(f"{source}: {field} is {repr(value)[:80]}, not a module name pattern or a list of "
                              "module names", hint="fix the adapter config (PEFT writes a list of names or a regex)")
    return frozenset(value)


def _expansion(items: object, limit: int = MAX_EXPANSION) -> int:
    """How large a parsed regex grows with every {m,n} multiplied out (a compiler expands them: the regex package
    took minutes and gigabytes on ``((a{1000}){1000}){1000}``, hostile pass 26, F1); stops counting past ``limit``."""
    total = 0
    for op, av in items:  # type: ignore[attr-defined]
        if op in _REPEATS:
            low, high, sub = av
            count = high if high != _sre.MAXREPEAT else max(low, 1)
            total += max(count, 1) * _expansion(sub, limit)
        elif op is _sre.SUBPATTERN:
            total += _expansion(av[-1], limit)
        elif op is _sre.BRANCH:
            total += sum(_expansion(branch, limit) for branch in av[1])
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            total += _expansion(av[1], limit)
        elif op is getattr(_sre, "ATOMIC_GROUP", None):
            total += _expansion(av, limit)
        else:
            total += 1
        if total > limit:
            return total
    return total


_REPEATS = tuple(getattr(_sre, name) for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
                 if hasattr(_sre, name))


def _timed(value: str, field: str, source: str, clock: MatchClock | None = None) -> _TimedRegex | None:
    if not read_alike(value):  # the regex package would read it otherwise than PEFT's re: unchecked (hp31 C81)
        return None
    try:
        import regex
    except ImportError:  # pragma: no cover - transformers (and PEFT) depend on it
        return None
    try:
        size = _expansion(_sre.parse(value))
    except (re.error, RecursionError, OverflowError, TypeError, ValueError):
        return None
    if size > MAX_EXPANSION:  # not compiled: unchecked, and said (no module name needs such a selector)
        return None
    try:
        return _TimedRegex(regex.compile(value), clock or _clock(field, source))
    except (regex.error, RecursionError, OverflowError):
        return None


def _compiles(value: str) -> bool:
    try:
        re.compile(value)  # compiling runs nothing against a name: nothing backtracks (and the length is bounded)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def _selects(selector: Selector, module: str) -> bool:
    if isinstance(selector, (ModulePattern, _TimedRegex, _Literal)):
        return selector.matches(module)
    # PEFT: the path itself, or a tail of it after a '.' (key.endswith(f".{name}")): looked up, not scanned (a list of
    # 500,000 names against 400 modules: hostile pass 27, F4)
    return any(tail in selector for tail in boundary_suffixes(module))


@dataclass(frozen=True)
class Targeting:
    """What one adapter config says about the modules it adapts (see the module's docstring)."""

    targets: Selector | None  # None: every module (no target_modules, or "all-linear": the module types decide)
    excluded: Selector | None
    saved: _SavedModules  # modules_to_save (with the task type's head): never adapted
    layers: int | frozenset[int] | None  # None: no layer test
    layer_lists: tuple[_TimedRegex, ...]  # PEFT's expression for each layers_pattern entry, in order
    source: str
    unchecked: tuple[str, ...] = ()  # selectors the automaton could not run
    shown: str = ""  # target_modules as the messages quote it
    all_linear: bool = False  # target_modules "all-linear": every Linear layer but the output layer

    @classmethod
    def of(cls, config: dict, source: str) -> Targeting:
        unchecked = []
        try:
            target = config.get("target_modules")
            all_linear = isinstance(target, str) and target.lower() == "all-linear"  # PEFT's test, any case
            targets = None if all_linear else _selector(target, "target_modules", source)
        except _Unchecked:
            targets, unchecked = None, ["target_modules"]
        try:
            excluded = _selector(config.get("exclude_modules"), "exclude_modules", source)
        except _Unchecked:
            excluded, unchecked = None, [*unchecked, "exclude_modules"]
        layers = _layers(config.get("layers_to_transform"), source)
        if config.get("layers_pattern") not in (None, [], "") and config.get("layers_to_transform") is None:
            raise CheckpointError(  # LoraConfig's own check (hostile pass 32, C153)
                f"{source}: layers_pattern is set without layers_to_transform; PEFT refuses such a config (the "
                "pattern only says where the layer numbers of layers_to_transform are)",
                hint="set layers_to_transform too, or remove layers_pattern")
        saved = config.get("modules_to_save")
        if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
            raise CheckpointError(  # a string: PEFT iterates its characters and fails to load (hp32 C146)
                f"{source}: modules_to_save is {repr(saved)[:80]}, not a list of module names",
                hint="write modules_to_save as a list, e.g. [\"lm_head\"]")
        names = config.get("layers_pattern") or []
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise CheckpointError(f"{source}: layers_pattern is {repr(names)[:80]}, not a name or a list of names",
                                  hint="fix the adapter config (PEFT writes the name of the model's layer list)")
        lists: tuple[_TimedRegex, ...] = ()
        if layers is not None and names:  # the entries matter only to a layer test
            runnable = sum(len(n) for n in names) <= MAX_SELECTOR_CHARS  # no compiling of 30 MB (hp26 F2)
            invalid = next((n for n in names if not _compiles(n)), None) if runnable else None
            if invalid is not None:  # PEFT could not compile it either: named, with re's own reason
                ModulePattern.compile(invalid, f"{source}: layers_pattern", whole=True)
            # PEFT's own expression, each entry pasted in as text (a top-level 'a|b' splits it, as in PEFT), run
            # once per module on the regex package under a time limit: no span-by-span automaton (hp27 F2)
            clock = _clock("layers_pattern", source)  # one budget for every entry (900 slow ones: hp28 F3)
            timed = [_timed(rf"(?:^|.*?\.){n}\.(?P<idx>\d+)\.", "layers_pattern", source, clock) if runnable
                     else None for n in names]
            if all(t is not None for t in timed):
                lists = tuple(t for t in timed if t is not None)
            else:  # too long, repeats that multiply out, or no regex package: no layer test here, and that is said
                layers, unchecked = None, [*unchecked, "layers_pattern"]
        saved_modules = _SavedModules.of(_saved_entries(config), source)
        if saved_modules.unchecked:
            unchecked.append("modules_to_save")
        return cls(targets, excluded, saved_modules, layers, lists,
                   source, tuple(unchecked), _shown(config.get("target_modules")), all_linear)

    def why_not(self, module: str) -> str | None:
        """Why PEFT would not adapt ``module`` (a module path of the base model), or None where it would."""
        if self.excluded is not None and _selects(self.excluded, module):
            return "exclude_modules names it"
        if self.saved.holds(module):
            return "modules_to_save names it: PEFT trains that module whole, without adapter layers"
        if self.all_linear and module.rsplit(".", 1)[-1] in _NOT_ALL_LINEAR:  # hp30 F5
            return ("all-linear selects the Linear layers but the output layer (PEFT's "
                    "_maybe_include_all_linear_layers), and no embedding")
        if self.targets is None:
            return None
        if not isinstance(self.targets, frozenset):  # a regex: layers_to_transform plays no part
            # PEFT matches a string against the whole path (re.fullmatch): 'query|value' selects no
            # 'encoder.layer.0.attention.self.query', which a reader of the regex expects it to (hp77a c06)
            return None if self.targets.matches(module) else (
                f"target_modules {self.shown} does not select it{self._look_alike(module)}: a target_modules string "
                "is a regular expression the module's whole path must match (PEFT's re.fullmatch), e.g. "
                "'.*\\.(q_proj|v_proj)' for every q_proj and v_proj")
        if module in self.targets:  # named whole: no layer test either
            return None
        if not _selects(self.targets, module):
            return f"target_modules {self.shown} does not select it{self._look_alike(module)}"
        if self.layers is None:
            return None
        index = self.layer_of(module)
        chosen = {self.layers} if isinstance(self.layers, int) else self.layers
        if index is None or index not in chosen:
            where = "no layer index PEFT finds" if index is None else f"layer {index}"
            return f"layers_to_transform is {sorted(chosen)[:20]}, and its path has {where}"
        return None

    def _look_alike(self, module: str) -> str:
        """A non-ASCII character of target_modules named, where the module's path is ASCII (hp75a c39: a Cyrillic
        'о' in 'q_prоj' was "target_modules ['q_prоj'] does not select" a q_proj)."""
        if not module.isascii():
            return ""
        entries = self.targets if isinstance(self.targets, frozenset) else [getattr(self.targets, "key", "")]
        return non_ascii_note(sorted(entries))

    def layer_of(self, module: str) -> int | None:
        """The layer index PEFT reads from ``module``'s path: the first ``<list>.<N>.``, the list matching one of
        layers_pattern (the first entry that matches wins), else any list after the first component."""
        match = None
        if not self.layer_lists:  # r".*?\.[^.]*\.(?P<idx>\d+)\.": re runs it without blowing up (no nesting)
            match = _DEFAULT_LAYER.match(module)
        for pattern in self.layer_lists:
            match = pattern.match(module)
            if match is not None:
                break
        if match is None or match.group("idx") is None:  # (a top-level '|' can match without the index group)
            return None
        digits = match.group("idx")
        return int(digits) if len(digits) <= _MAX_INDEX_DIGITS else -1  # an index no layers_to_transform holds


_DEFAULT_LAYER = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def _shown(target: object) -> str:
    return repr(target[:80]) if isinstance(target, str) else str(sorted(target)[:8]) if isinstance(target, list) \
        else repr(target)


def _layers(value: object, source: str) -> int | frozenset[int] | None:
    """``layers_to_transform``: an index, a list of them, or None (also an empty list: PEFT tests no layer then)."""
    if value is None or value == []:
        return None
    listed = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(listed, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in listed):
        raise CheckpointError(f"{source}: layers_to_transform is {repr(value)[:80]}, not a layer index or a list "
                              "of them", hint="fix the adapter config (PEFT writes a list of non-negative integers)")
    return value if isinstance(value, int) else frozenset(listed)


@dataclass(frozen=True)
class _SavedModules:
    """``modules_to_save`` as PEFT's guard reads it: ``re.match(rf"(^|.*\\.){entry}($|\\..*)", module)``, each entry
    pasted in as text. A plain name (the usual ``classifier``, ``lm_head``) matches a whole component, looked up in a
    set; the other entries run as one expression (each wrapped as PEFT wraps it), once per module, on the regex
    package under a time limit: no per-span or per-entry loop (10,000 entries, 3,000-component paths: hostile
    passes 26 F3, 27 F1). Where that cannot run (too long, repeats that multiply out, no regex package), the entries
    are compared as names, and that is said."""

    names: frozenset[str]
    pattern: _TimedRegex | None
    unchecked: bool = False
    dotted: frozenset[str] = frozenset()  # the fallback's entries with dots: runs of whole components of the path
    spans: tuple[int, ...] = ()  # their numbers of components

    @classmethod
    def of(cls, entries: list[str], source: str) -> _SavedModules:
        names = {e for e in entries if _PLAIN.fullmatch(e)}
        regexes = [e for e in entries if e not in names]
        if not regexes:
            return cls(frozenset(names), None)
        joined = "|".join(rf"(?:(?:^|.*\.){e}(?:$|\..*))" for e in regexes)
        runnable = len(joined) <= MAX_SELECTOR_CHARS  # else nothing is compiled (3,000 of 18,000 characters: hp28 F6)
        invalid = next((e for e in regexes if not _compiles(e)), None) if runnable else None
        if invalid is not None:  # PEFT could not compile it (joined with the others it might: hp27 N4): named
            ModulePattern.compile(invalid, f"{source}: modules_to_save", whole=True, max_chars=MAX_SELECTOR_CHARS)
        timed = _timed(joined, "modules_to_save", source) if runnable else None
        if timed is None:  # compared as names: right for the dotted paths such entries almost always are
            dotted = {e for e in regexes if "." in e}
            spans = sorted({e.count(".") + 1 for e in dotted})
            if len(spans) > MAX_SPANS:  # each length is a lookup per component of every module: not looked up
                dotted, spans = set(), []
            return cls(frozenset(names | (set(regexes) - dotted)), None, True, frozenset(dotted), tuple(spans))
        return cls(frozenset(names), timed)

    def holds(self, module: str) -> bool:
        parts = module.split(".")
        if any(part in self.names for part in parts):
            return True
        if self.pattern is None:  # the unchecked fallback: an entry with dots names a run of whole components
            return any(".".join(parts[i:i + n]) in self.dotted for n in self.spans for i in range(len(parts) - n + 1))
        return self.pattern.match(module) is not None


_PLAIN = re.compile(r"[A-Za-z0-9_]+")  # a module name that means itself as a regex too


def saved_as_whole(config: dict) -> Callable[[str], bool]:
    """Whether PEFT puts a saved whole copy of a module (``<module>.modules_to_save.<adapter>.weight``) back when it
    loads the adapter: ``modules_to_save`` (with the task type's head) names the end of its path (``_set_trainable``:
    ``key.endswith(entry)``). Built once per adapter (per module, 15,000 saved copies cost minutes: hp28 F4)."""
    entries = tuple(_saved_entries(config))
    return lambda module: module.endswith(entries)


def _saved_entries(config: dict) -> list[str]:
    """``modules_to_save`` with the heads PEFT adds for the config's task type."""
    saved = config.get("modules_to_save")
    saved = [m for m in saved if isinstance(m, str) and m] if isinstance(saved, list) else []
    return saved + [m for m in _TASK_HEADS.get(str(config.get("task_type")), ()) if m not in saved]


def feedforward(config: dict, source: str) -> Callable[[str], bool] | None:
    """(IA)³'s ``feedforward_modules`` as PEFT reads it (``_check_target_module_feedforward``): a string is a regex
    the whole path matches, a list names the end of the path (no '.' boundary); None where the config does not say
    (PEFT then takes its table for the model type) or says it with a regex tiesmerge does not run."""
    value = config.get("feedforward_modules")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            pattern = _selector(value, "feedforward_modules", source)
        except _Unchecked:
            return None
        return None if pattern is None else pattern.matches  # type: ignore[union-attr]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{source}: feedforward_modules is {repr(value)[:80]}, not a module name pattern or a "
                              "list of module names", hint="fix the adapter config (PEFT writes a list of names)")
    names = tuple(value)
    return lambda module: module.endswith(names)  # PEFT: any(key.endswith(name)), no '.' boundary; in C


# transformers' Conv1D (weight stored (in, out)): every module built as one in transformers 5.25's models (the GPT-2
# family's attention and MLP; CLVP's decoder MLP). PEFT decides by the module's class, not by the config: LoRA's and
# (IA)³'s fan_in_fan_out is forced True on a Conv1D and False on an nn.Linear (with a warning).
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_decoder"})
_CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


def conv1d_layout(model_types: tuple[str, ...] | None, module: str, fan_in_fan_out: bool) -> bool:
    """Whether the base stores ``module``'s weight as (in, out) (transformers' Conv1D), so that a LoRA's ΔW is
    s (B A)ᵀ and an (IA)³ vector scales the weight's columns where it scales outputs: PEFT's rule, by the module's
    class, whatever the config's fan_in_fan_out says. ``model_types``: the base config's model_type and those of
    the models it nests (an EncoderDecoderModel's GPT-2 decoder: hostile pass 32, C02); the config decides only
    where the base's architecture is not known (a lone weights file: None)."""
    if model_types is None:
        return fan_in_fan_out
    return not _CONV1D_MODEL_TYPES.isdisjoint(model_types) and module.rsplit(".", 1)[-1] in _CONV1D_MODULES


def warn_layout_unknown(model_types: tuple[str, ...] | None, modules: Sequence[str], fan_in_fan_out: bool,
                        source: str) -> None:
    """Where the base has no config (a lone weights file), the adapter's fan_in_fan_out decides the layout of its
    modules; for modules named as transformers' Conv1D ones that is a guess the merge cannot check (a square weight
    fits either way), so it is said (hostile pass 31, C21)."""
    if model_types is not None:
        return
    named = [m for m in modules if m.rsplit(".", 1)[-1] in _CONV1D_MODULES]
    if named:
        warnings.warn(MergeWarning(
            f"{source}: the base has no config.json naming its model_type, so the layout of {len(named)} adapted "
            f"module(s) such as {named[0]!r} is taken from the adapter's fan_in_fan_out "
            f"({str(fan_in_fan_out).lower()}): "
            + ("(in, out), as a transformers Conv1D" if fan_in_fan_out else "(out, in), as a torch.nn.Linear")
            + "; a GPT-2-family base stores them as Conv1D, so if that is wrong the change is applied transposed: "
              "pass the base as its model directory, with the config.json (model_type) it was saved with, to have "
              "its architecture decide"),
            stacklevel=4)


def base_model_types(base: Any) -> tuple[str, ...] | None:
    """The base config's ``model_type`` first, then those of the configs it nests (encoder, decoder, text_config,
    ...); None where it has no readable config (a lone file, a state dict)."""
    from .align import read_model_config  # align imports the adapter readers, which import this module

    try:
        config = read_model_config(base)
    except CheckpointError:
        return None  # a damaged config is said where the merge reads it for its other uses
    top = config.get("model_type")
    if not isinstance(top, str):
        return None
    nested = [value.get("model_type") for value in config.values() if isinstance(value, dict)]
    return (top, *(t for t in nested if isinstance(t, str)))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_adapted(config: dict, modules: Sequence[str], source: str, *, whole: Sequence[str] = ()) -> None:
    """Refuse adapter weights for ``modules`` (factors, vectors) that PEFT would not adapt, and saved whole copies
    (``whole``: their modules) that ``modules_to_save`` does not name: PEFT would load the adapter without them."""
    long = next((m for m in (*modules, *whole) if len(m) > MAX_MODULE_CHARS or m.count(".") >= MAX_COMPONENTS), None)
    if long is not None:  # binding a path to the base's names costs its components squared (hostile pass 27, F1)
        raise CheckpointError(f"{source}: the adapter holds weights for a module path of {len(long):,} characters "
                              f"and {long.count('.') + 1:,} components ({long[:80]!r}...); no model has such a module "
                              f"(at most {MAX_MODULE_CHARS:,} characters and {MAX_COMPONENTS} components are read)",
                              hint="the adapter file is damaged or not a PEFT adapter of a real model")
    control = next((m for m in (*modules, *whole) if _CONTROL.search(m)), None)
    if control is not None:  # hostile pass 32, C79: re's $ matches before a final newline, '.' never a newline
        raise CheckpointError(f"{source}: the adapter holds weights for the module path {control[:120]!r}, which holds "
                              "a control character (a newline, a tab, ...); PEFT's patterns read such paths in ways "
                              "tiesmerge does not reproduce, and no model names its modules so",
                              hint="the adapter file is damaged, or its model's module names are: rename the modules")
    declared = config.get("target_modules")
    if declared in ([], "") and modules:  # PEFT 0.21: "No target_modules passed" (hp30 N7)
        raise IncompatibleCheckpointsError(
            f"{source}: target_modules is an empty {'list' if declared == [] else 'string'}, so PEFT adapts no module "
            f"(and refuses to load the adapter), but the file holds weights for {len(modules)} module(s), e.g. "
            f"{modules[0]!r}", hint="the config does not describe these weights: fix target_modules to name the "
                                    "adapted modules")
    if declared is None and modules:  # hostile pass 31, C29: PEFT fills it from its table, per model type
        raise IncompatibleCheckpointsError(
            f"{source}: target_modules is not set, so PEFT adapts its own default modules for the model type (from "
            f"its table, e.g. only q_proj and v_proj of a Llama) and drops the adapter's other weights; the file "
            f"holds weights for {len(modules)} module(s), e.g. {modules[0]!r}, and which of them PEFT keeps depends "
            "on that table, which tiesmerge does not guess",
            hint="set target_modules in the adapter config to the modules it was trained on (PEFT writes them when "
                 "it saves an adapter)")
    targeting = Targeting.of(config, source)
    stray = [(m, why) for m in modules if (why := targeting.why_not(m)) is not None]
    none_adapted = bool(modules) and len(stray) == len(modules)
    saved = saved_as_whole(config)
    stray += [(m, "modules_to_save does not name it, so PEFT has no place for its saved copy")
              for m in whole if not saved(m)]
    if stray:
        first, why = stray[0]
        outcome = ("PEFT adapts none of them (the adapter it loads does nothing, or it refuses to load one whose "
                   "config selects no module of the base at all)" if none_adapted else  # hp31 C62
                   "PEFT would load the adapter without them, so the merge would not be of the adapter that runs")
        # a module name and a target_modules entry printed alike (hp74a c31): the code points said
        listed = config.get("target_modules")
        entries = [listed] if isinstance(listed, str) else list(listed) if isinstance(listed, (list, tuple)) else []
        last = first.rsplit(".", 1)[-1]
        twin = normalization_twin(last, (e for e in entries if isinstance(e, str)))
        raise IncompatibleCheckpointsError(
            f"{source}: the adapter has weights for {len(stray)} module(s) its config does not adapt, e.g. "
            f"{first!r} ({why}); {outcome}",
            hint=f"{apart(last, twin)}: write target_modules with the module names as the weights hold them" if twin
            else "the config does not describe these weights: fix target_modules (or exclude_modules, "
                 "modules_to_save, layers_to_transform) to name the adapted modules, or save the adapter again")
    beside = [k for k in ("layers_to_transform", "layers_pattern") if config.get(k) is not None]
    if isinstance(config.get("target_modules"), str) and beside:  # hp29 N12
        warnings.warn(MergeWarning(
            f"{source}: target_modules is a string (a regex, or all-linear) and {' and '.join(beside)} is set: PEFT "
            "0.21 refuses to load such a config, older PEFT ignored the layers; merged as older PEFT loaded it, every "
            "module target_modules selects, in every layer"), stacklevel=4)
    if targeting.unchecked:
        warnings.warn(MergeWarning(
            f"{source}: {' and '.join(targeting.unchecked)} holds a regex whose effect in PEFT tiesmerge does not "
            f"reproduce (more than {MAX_SELECTOR_CHARS:,} characters, repeats that multiply out past "
            f"{MAX_EXPANSION:,}, or a feature only a backtracking engine runs while the regex package is not "
            "installed), so whether PEFT adapts each of the adapter's modules is not checked: make sure its weights "
            "are the ones PEFT loads"),
            stacklevel=4)
