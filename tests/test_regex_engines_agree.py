"""Adapter regexes run on three engines (re where it runs linearly, tiesmerge's automaton, the regex package under a
time limit); PEFT matches with Python's re. A seeded differential fuzz: every pattern any engine accepts selects
exactly the modules re selects, for target_modules (re.fullmatch) and alpha_pattern keys (re.match of
``(.*\\.)?(key)$``). Hostile pass 31, C81: a POSIX class ([[:alpha:]]) and fuzzy braces ({e<=1}) read otherwise."""

from __future__ import annotations

import re
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiesmerge.errors import CheckpointError
from tiesmerge.io.patterns import PatternTable
from tiesmerge.io.peft_targets import Targeting

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.10.mlp.up_proj",
           "model.layers.2.self_attn.qq_proj", "q_proj", "x.q_projj", "model.embed_tokens", "lm_head",
           "model.layers.3.mlp.down_proj", "a[b].q_proj", "model.layers.0.self_attn.v_proj:0", "layers.7.kproj",
           # where the regex package's classes differ from re's (hostile pass 32, C23): a combining accent, a
           # superscript digit, a zero-width joiner, an Arabic-Indic digit
           "blk.q\u0301proj", "blk.q\u00b2proj", "blk.q\u200dproj", "layers.\u0663.q_proj"]

# atoms hold no repeat, and repeats apply to atoms or to groups of atoms only: no repeat nests in another, so re
# (the reference, a backtracking engine) never takes exponential time on the fuzzed names; the engines under test are
# held to their own time bounds elsewhere
_ATOMS = st.sampled_from(["q", "k", "v", "_", "proj", ".", r"\.", r"\d", r"\w", r"\D", "[a-z]", "[^.]", "[qk]",
                          "[[:alpha:]]", "[[:digit:]]", "[:q]", "0", "1", "layers", "self_attn", "mlp", "up", "^", "$",
                          r"\b", r"\[", "]", "q_proj", "k_proj", "_proj", r"layers\.", r"self_attn\.",
                          "[[:alpha:]]_proj", r"\W", r"\s", r"\S", r"\B", "blk", r"(q|k)\w*proj"])
_QUANTIFIERS = st.sampled_from(["*", "+", "?", "{1,2}", "{0,1}", "{2}", "*?", "+?", "{e<=1}", "{,2}", "{1,}", "{x}"])
_SEQUENCES = st.lists(_ATOMS, min_size=1, max_size=3).map("".join)
_REPEATED = st.one_of(
    st.tuples(_ATOMS, _QUANTIFIERS).map(lambda aq: f"(?:{aq[0]}){aq[1]}"),
    st.tuples(_SEQUENCES, _SEQUENCES, _QUANTIFIERS).map(lambda abq: f"(?:{abq[0]}|{abq[1]}){abq[2]}"),
    st.sampled_from([".*", ".+", r"\w+", "[a-z_]+", r"\d+", ".*?", r"layers\.\d+\.", r"\w*", r"\W?"]))


def _extend(inner):
    return st.one_of(
        st.lists(inner, min_size=2, max_size=4).map("".join),
        st.tuples(inner, inner).map(lambda ab: f"(?:{ab[0]}|{ab[1]})"),
        st.tuples(inner, inner).map(lambda ab: f"({ab[0]}|{ab[1]})"),
        st.tuples(inner, inner).map(lambda ab: f"(?={ab[0]}){ab[1]}"),
        st.tuples(inner, inner).map(lambda ab: f"(?!{ab[0]}){ab[1]}"),
    )


_PATTERNS = st.recursive(st.one_of(_ATOMS, _REPEATED), _extend, max_leaves=8)
ENGINES = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _re(pattern: str, module: str, whole: bool) -> bool | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return bool(re.fullmatch(pattern, module) if whole else re.match(rf"(.*\.)?({pattern})$", module))
        except re.error:
            return None


@ENGINES
@given(pattern=st.one_of(_PATTERNS, st.tuples(st.sampled_from([".*\\.", ".*", r"model\.layers\.\d+\..*"]),
                                               _PATTERNS).map("".join)))
def test_target_modules_select_as_re(pattern):
    if _re(pattern, "q_proj", True) is None:
        return  # not a regex re compiles: refused by both (tested elsewhere)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning of any engine reaches the user
            targeting = Targeting.of({"target_modules": pattern}, "cfg")
            ours = [targeting.why_not(m) is None for m in MODULES]
    except CheckpointError:
        return  # refused with a message (a feature none of the engines runs as re does)
    if targeting.unchecked:
        return  # said to the user as not checked
    assert ours == [_re(pattern, m, True) for m in MODULES], pattern


@ENGINES
@given(pattern=_PATTERNS)
def test_pattern_table_keys_match_as_re(pattern):
    if _re(pattern, "q_proj", False) is None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            table = PatternTable({pattern: 3}, "alpha_pattern", "cfg", lambda value, what: float(value))
            ours = [table.lookup(m) == 3 for m in MODULES]
    except CheckpointError:
        return
    assert ours == [_re(pattern, m, False) for m in MODULES], pattern
