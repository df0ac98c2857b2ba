"""Seeded property-based fuzz (hypothesis) of what a user's files can hold: safetensors headers,
index files, configs, adapter configs and recipes. Whatever they hold, tiesmerge either reads
them or raises one of its typed errors: never another exception, never a hang.

Cross-cutting (readers, limits, adapters, recipes). Seeded (derandomize) so that a failure
reproduces; sized to run in well under a minute on two cores.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import make_base, write_hf_dir
from tiesmerge.errors import TiesMergeError
from tiesmerge.io.adapters import open_adapter
from tiesmerge.io.align import align
from tiesmerge.io.checkpoint import open_checkpoint
from tiesmerge.recipe import load_recipe

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                     | st.text(max_size=12),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                     max_leaves=12)
_dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X9", "", 5])
_shape = st.lists(st.integers(-2, 5), max_size=3) | _json


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _opens_or_typed(path: Path, **kwargs) -> None:
    try:
        ckpt = open_checkpoint(path, **kwargs)
    except TiesMergeError:
        return
    ckpt.close()


def _header_entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@FUZZ
@given(entries=st.dictionaries(st.text(min_size=1, max_size=6), st.tuples(_dtypes, _shape, st.integers(-4, 80),
                                                                            st.integers(-4, 80)), max_size=4),
       data_len=st.integers(0, 96), claimed=st.none() | st.integers(0, 2**64 - 1), extra=_json,
       tail=st.binary(max_size=8))
def test_safetensors_headers(workdir, entries, data_len, claimed, extra, tail):
    header = {name: _header_entry(*value) for name, value in entries.items()}
    if isinstance(extra, dict):
        header["__metadata__"] = extra
    raw = json.dumps(header).encode() + tail
    length = len(raw) if claimed is None else claimed
    path = workdir / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", length) + raw + b"\0" * data_len)
    _opens_or_typed(path)


@FUZZ
@given(index=_json | st.fixed_dictionaries({"weight_map": _json | st.lists(_json, max_size=3)}) | st.fixed_dictionaries(
    {"weight_map": st.dictionaries(st.text(max_size=6), _json, max_size=3)}) | st.fixed_dictionaries(
    {"weight_map": st.dictionaries(st.text(max_size=6), st.sampled_from(
        ["model.safetensors", "../model.safetensors", "/etc/passwd", "", "sub/x.safetensors", "config.json",
         "nope.safetensors", "."]), max_size=4)}))
def test_index_files(workdir, index):
    model = workdir / "indexed"
    if not model.exists():
        write_hf_dir(model, {"w": torch.ones(2, 2)})
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    _opens_or_typed(model)


@FUZZ
@given(config=_json | st.fixed_dictionaries({"tie_word_embeddings": _json, "torch_dtype": _json}))
def test_configs(workdir, config):
    model = workdir / "configured"
    if not model.exists():
        write_hf_dir(model, {"model.embed_tokens.weight": torch.ones(4, 2), "lm_head.weight": torch.ones(4, 2)})
    (model / "config.json").write_text(json.dumps(config))
    try:
        ckpt = open_checkpoint(model)
        try:
            align(ckpt, [ckpt])
        finally:
            ckpt.close()
    except TiesMergeError:
        pass
    from tiesmerge.io.writer import model_files  # the files copied into the output, checked up front

    try:
        model_files(model)
    except TiesMergeError:
        pass


_patterns = st.text(alphabet="aq_proj.*+?()|[]{}\\$^0123,-", max_size=10)


@FUZZ
@given(alpha=_json | st.integers(-3, 64) | st.floats(allow_nan=True),
       pattern=st.dictionaries(_patterns, _json | st.floats(-4, 4), max_size=3) | _json,
       peft_type=st.sampled_from(["LORA", "lora", "IA3", "PREFIX", None, 3]), rank=st.integers(0, 3),
       extra=st.dictionaries(st.sampled_from(["use_dora", "use_rslora", "fan_in_fan_out", "target_modules"]), _json,
                             max_size=2))
def test_adapter_configs(workdir, alpha, pattern, peft_type, rank, extra):
    base = make_base(0)
    module = "model.layers.0.self_attn.q_proj"
    base_dir = workdir / "lora-base"
    if not base_dir.exists():
        write_hf_dir(base_dir, base)
    adapter = workdir / "lora"
    factors = random_lora(base, max(rank, 1), 0, modules=(module,))
    write_lora_dir(adapter, factors, alpha=4.0,
                   config={"lora_alpha": alpha, "alpha_pattern": pattern, "peft_type": peft_type, **extra})
    if rank == 0:
        save_file({f"base_model.model.{module}.lora_A.weight": torch.zeros(0, 8),
                   f"base_model.model.{module}.lora_B.weight": torch.zeros(8, 0)},
                  str(adapter / "adapter_model.safetensors"))
    try:
        opened = open_adapter(adapter, "fuzz")
    except TiesMergeError:
        return
    base_ckpt = open_checkpoint(base_dir)
    try:
        opened.bind(base_ckpt)
    except TiesMergeError:
        pass
    finally:
        opened.close()
        base_ckpt.close()


_scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.sampled_from(
    ["ties", "average", "task_arithmetic", "bf16", "2GiB", "cpu", "x", "densty", "base", "./m"])
_recipe_values = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    st.sampled_from(["path", "weight", "stats", "density", "lam", "model", "parameters", "x"]), kids, max_size=3),
    max_leaves=8)


@FUZZ
@given(recipe=st.dictionaries(st.sampled_from(["method", "base", "models", "parameters", "dtype", "shard_size",
                                               "memory_budget", "device", "vocab_policy", "allow_pickle", "stats",
                                               "rank", "output_format", "merge_method", "base_model", "densty"]),
                              _recipe_values, max_size=6),
       text=st.none() | st.text(alphabet="ab:&*[]{}-\n !|>'\"#", max_size=40))
def test_recipes(workdir, recipe, text):
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe) if text is None else text)
    try:
        load_recipe(path)
    except TiesMergeError:
        pass


@FUZZ
@given(key=st.text(alphabet="aq._*+?|()[]{}1,^$\\d", min_size=1, max_size=10),
       names=st.lists(st.text(alphabet="aq._1", max_size=10), min_size=1, max_size=5))
def test_pattern_automaton_agrees_with_re(key, names):
    """alpha_pattern keys run on an automaton: the same answers as Python's re (PEFT's matcher),
    on names short enough that re's backtracking stays cheap."""
    import re

    from tiesmerge.io.patterns import ModulePattern

    try:
        re.compile(key)  # on its own first: ")(" would pass inside PEFT's wrapper
        compiled = re.compile(rf"(.*\.)?({key})$")
    except re.error:
        with pytest.raises(TiesMergeError):
            ModulePattern.compile(key, "fuzz")
        return
    try:
        pattern = ModulePattern.compile(key, "fuzz")
    except TiesMergeError as exc:  # only what needs backtracking (or a huge repeat) is refused
        assert "does not run" in exc.message
        return
    for name in names:
        assert pattern.matches(name) == bool(compiled.match(name)), (key, name)
