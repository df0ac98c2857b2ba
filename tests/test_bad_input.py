"""Hostile input through the API and the CLI: every bad input gets a typed error that names the
file and/or tensor, and leaves no output directory (nor a temporary sibling) behind.

Cross-cutting (not one source module): inputs, readers, alignment, options, the writer, exit codes.

Why over 400 lines: every bad input of the CLI and the API, in one place where a hostile-input
review can read them all.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch

import tiesmerge
from helpers_ckpt import (
    assert_no_output,
    leftovers,
    make_family,
    write_hf_dir,
    write_pickle,
    write_safetensors,
)
from tiesmerge import errors
from tiesmerge.engine import kernels
from tiesmerge.errors import (
    CheckpointError,
    ConfigError,
    IncompatibleCheckpointsError,
    InvalidTensorError,
    OutputError,
    TiesMergeError,
)
from tiesmerge.io import writer as writer_mod

# ------------------------------------------------------------------ scenario builders
# Each takes tmp_path and returns (base, models, method options).


def _hf_family(tmp_path, n=2, mutate=None, shards=2):
    base, fts = make_family(n)
    if mutate:
        mutate(base, fts)
    b = write_hf_dir(tmp_path / "base", base, shards=shards)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft, shards=shards) for k, ft in enumerate(fts)]
    return b, ms


def missing_base(tmp_path):
    _, ms = _hf_family(tmp_path)
    return tmp_path / "no-such-base", ms, {}


def missing_model(tmp_path):
    b, ms = _hf_family(tmp_path)
    return b, [ms[0], tmp_path / "no-such-model"], {}


def model_listed_twice(tmp_path):
    b, ms = _hf_family(tmp_path)
    return b, [ms[0], ms[1], Path(str(ms[0]) + "/")], {}


def model_is_base(tmp_path):
    b, ms = _hf_family(tmp_path)
    return b, [ms[0], b], {}


def model_lacks_tensor(tmp_path):
    return (*_hf_family(tmp_path, mutate=lambda b, f: f[1].pop("model.layers.1.mlp.up_proj.weight")), {})


def model_has_extra_tensor(tmp_path):
    def mutate(b, f):
        f[0]["extra.weight"] = torch.zeros(2)
    return (*_hf_family(tmp_path, mutate=mutate), {})


def shapes_differ(tmp_path):
    def mutate(b, f):
        f[2]["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 9)
    return (*_hf_family(tmp_path, n=3, mutate=mutate), {})


def int_where_float_must_merge(tmp_path):
    def mutate(b, f):
        f[1]["model.norm.weight"] = torch.ones(8, dtype=torch.int32)
    return (*_hf_family(tmp_path, mutate=mutate), {})


def truncated_shard(tmp_path):
    b, ms = _hf_family(tmp_path)
    shard = ms[1] / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-20])
    return b, ms, {}


def corrupt_header(tmp_path):
    b, ms = _hf_family(tmp_path)
    shard = b / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"{not json" + b" " * (n - 9)
    shard.write_bytes(bytes(data))
    return b, ms, {}


def garbage_file(tmp_path):
    b, ms = _hf_family(tmp_path)
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\xff" * 64)
    return b, [ms[0], bad], {}


def index_names_missing_shard(tmp_path):
    b, ms = _hf_family(tmp_path)
    (ms[0] / "model-00002-of-00002.safetensors").unlink()
    return b, ms, {}


def index_names_tensor_no_shard_holds(tmp_path):
    b, ms = _hf_family(tmp_path)
    index = ms[0] / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    return b, ms, {}


def index_not_json(tmp_path):
    b, ms = _hf_family(tmp_path)
    (b / "model.safetensors.index.json").write_text("{oops")
    return b, ms, {}


def pickle_without_allow(tmp_path):
    base, fts = make_family(2)
    b = write_safetensors(tmp_path / "base.safetensors", base)
    return b, [write_pickle(tmp_path / "ft0.bin", fts[0]), write_pickle(tmp_path / "ft1.pt", fts[1])], {}


def not_a_model_file(tmp_path):
    b, ms = _hf_family(tmp_path)
    txt = tmp_path / "weights.txt"
    txt.write_text("hi")
    return b, [ms[0], txt], {}


def empty_directory(tmp_path):
    b, ms = _hf_family(tmp_path)
    (tmp_path / "empty").mkdir()
    return b, [ms[0], tmp_path / "empty"], {}


def unknown_method(tmp_path):
    b, ms = _hf_family(tmp_path)
    return b, ms, {"method": "tie"}


def unknown_option(tmp_path):
    b, ms = _hf_family(tmp_path)
    return b, ms, {"densty": 0.3}


def weights_count_wrong(tmp_path):
    b, ms = _hf_family(tmp_path)
    return b, ms, {"weights": [1.0, 2.0, 3.0]}


def bad_vocab_policy(tmp_path):
    b, ms = _hf_family(tmp_path)
    return b, ms, {"vocab_policy": "pad"}


def bad_memory_budget(tmp_path):
    b, ms = _hf_family(tmp_path)
    return b, ms, {"memory_budget": "lots"}


def bad_shard_size(tmp_path):
    b, ms = _hf_family(tmp_path)
    return b, ms, {"shard_size": "-5GB"}


def bad_dtype(tmp_path):
    b, ms = _hf_family(tmp_path)
    return b, ms, {"dtype": "int8"}


def bad_device(tmp_path):
    b, ms = _hf_family(tmp_path)
    return b, ms, {"device": "tpu"}


# (builder, error type, substrings the message must hold; "{b}", "{m0}", "{m1}", "{tmp}" are formatted)
CASES = {
    "missing_base": (missing_base, CheckpointError, ["{tmp}/no-such-base", "no such file"]),
    "missing_model": (missing_model, CheckpointError, ["{tmp}/no-such-model", "no such file"]),
    "model_listed_twice": (model_listed_twice, ConfigError, ["listed twice", "ft0"]),
    "model_is_base": (model_is_base, ConfigError, ["is the base itself", "{b}"]),
    "model_lacks_tensor": (model_lacks_tensor, IncompatibleCheckpointsError,
                           ["model 1", "{m1}", "'model.layers.1.mlp.up_proj.weight'", "missing"]),
    "model_has_extra_tensor": (model_has_extra_tensor, IncompatibleCheckpointsError,
                               ["model 0", "{m0}", "'extra.weight'"]),
    "shapes_differ": (shapes_differ, IncompatibleCheckpointsError,
                      ["'model.layers.0.self_attn.q_proj.weight'", "model 2", "(8, 8)", "(8, 9)", "{b}", "{m0}",
                       "{m1}"]),
    "int_where_float_must_merge": (int_where_float_must_merge, IncompatibleCheckpointsError,
                                   ["'model.norm.weight'", "int32", "{m1}/model-0000", "floating"]),
    "truncated_shard": (truncated_shard, CheckpointError, ["{m1}/model-00002-of-00002.safetensors"]),
    "corrupt_header": (corrupt_header, CheckpointError, ["{b}/model-00001-of-00002.safetensors"]),
    "garbage_file": (garbage_file, CheckpointError, ["{tmp}/garbage.safetensors"]),
    "index_names_missing_shard": (index_names_missing_shard, CheckpointError,
                                  ["{m0}/model.safetensors.index.json", "model-00002-of-00002.safetensors"]),
    "index_names_tensor_no_shard_holds": (index_names_tensor_no_shard_holds, CheckpointError,
                                          ["{m0}", "'ghost.weight'"]),
    "index_not_json": (index_not_json, CheckpointError, ["{b}/model.safetensors.index.json"]),
    "pickle_without_allow": (pickle_without_allow, CheckpointError, ["{tmp}/ft0.bin", "pickle"]),
    "not_a_model_file": (not_a_model_file, CheckpointError, ["{tmp}/weights.txt"]),
    "empty_directory": (empty_directory, CheckpointError, ["{tmp}/empty", "no model weights"]),
    "unknown_method": (unknown_method, ConfigError, ["'tie'", "did you mean 'ties'"]),
    "unknown_option": (unknown_option, ConfigError, ["'densty'", "did you mean 'density'"]),
    "weights_count_wrong": (weights_count_wrong, ConfigError, ["3 weights", "2 models"]),
    "bad_vocab_policy": (bad_vocab_policy, ConfigError, ["'pad'"]),
    "bad_memory_budget": (bad_memory_budget, ConfigError, ["memory_budget", "lots"]),
    "bad_shard_size": (bad_shard_size, ConfigError, ["shard_size"]),
    "bad_dtype": (bad_dtype, ConfigError, ["'int8'"]),
    "bad_device": (bad_device, ConfigError, ["'tpu'"]),
}


def _run(tmp_path, builder, **extra):
    base, models, opts = builder(tmp_path)
    opts = {**opts, **extra}
    method = opts.pop("method", "ties")
    return tiesmerge.merge(base, models, method, output=tmp_path / "out", **opts)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_typed_error_names_culprit_and_leaves_nothing(tmp_path, case):
    builder, exc_type, needles = CASES[case]
    with pytest.raises(exc_type) as info:
        _run(tmp_path, builder)
    msg = str(info.value)
    for needle in needles:
        needle = needle.format(tmp=tmp_path, b=tmp_path / "base", m0=tmp_path / "ft0", m1=tmp_path / "ft1")
        assert needle in msg, f"{needle!r} not in:\n{msg}"
    assert isinstance(info.value, TiesMergeError) and info.value.message
    assert_no_output(tmp_path / "out")


def test_error_types_and_exit_codes():
    assert ConfigError("x").exit_code == 2 and issubclass(ConfigError, ValueError)
    for cls in (CheckpointError, IncompatibleCheckpointsError, InvalidTensorError, OutputError):
        assert cls("x").exit_code == 1 and issubclass(cls, TiesMergeError)
    many = ConfigError(["a", "b"], hint="h")
    assert many.problems == ["a", "b"] and "2 problems" in str(many) and "hint: h" in str(many)
    assert set(errors.__all__) >= {"ConfigError", "CheckpointError", "OutputError"}


def test_shapes_differ_lists_every_models_shape(tmp_path):
    with pytest.raises(IncompatibleCheckpointsError) as info:
        _run(tmp_path, shapes_differ)
    table = [line for line in str(info.value).splitlines() if line.strip().startswith(("base", "model"))]
    assert len(table) == 4, str(info.value)  # base + 3 models, each with its shape
    assert all("(8, " in line for line in table)


# ------------------------------------------------------------------ NaN / Inf


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
@pytest.mark.parametrize("who", ["base", "ft1"])
@pytest.mark.parametrize("method", ["ties", "average"])
def test_non_finite_values_name_file_and_tensor(tmp_path, value, kind, who, method):
    base, fts = make_family(2)
    target = base if who == "base" else fts[1]
    target["model.layers.1.mlp.up_proj.weight"][3, 2] = value
    b = write_hf_dir(tmp_path / "base", base, shards=2)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft, shards=2) for k, ft in enumerate(fts)]
    with pytest.raises(InvalidTensorError) as info:
        tiesmerge.merge(b, ms, method, output=tmp_path / "out")
    msg = str(info.value)
    assert "'model.layers.1.mlp.up_proj.weight'" in msg and kind in msg
    assert str(tmp_path / who) in msg and ".safetensors" in msg  # the shard file that holds it
    assert_no_output(tmp_path / "out")


def test_non_finite_value_in_state_dict_names_it(tmp_path):
    base, fts = make_family(2)
    fts[0]["model.norm.weight"][0] = float("nan")
    with pytest.raises(InvalidTensorError, match=r"models\[0\] state dict.*'model.norm.weight'.*NaN"):
        tiesmerge.merge(base, fts, "ties")


def test_non_finite_value_in_chunked_tensor(tmp_path):
    base, fts = make_family(2)
    fts[1]["model.embed_tokens.weight"][30, 1] = float("inf")
    with pytest.raises(InvalidTensorError, match=r"'model.embed_tokens.weight'.*Inf.*flat index 241"):
        tiesmerge.merge(base, fts, "task_arithmetic", memory_budget=3000)


def test_pickle_with_allow_pickle_is_not_an_error(tmp_path):
    out = _run(tmp_path, pickle_without_allow, allow_pickle=True)
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------ option values


@pytest.mark.parametrize("density", [0, 0.0, 1.5, 20, -0.1, float("nan")])
@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_density_outside_unit_interval(tmp_path, density, method):
    b, ms = _hf_family(tmp_path)
    with pytest.raises(ConfigError) as info:
        tiesmerge.merge(b, ms, method, output=tmp_path / "out", density=density)
    msg = str(info.value)
    assert "density" in msg and "fraction" in msg
    if isinstance(density, (int, float)) and density > 1:
        assert "percent" in msg
    assert_no_output(tmp_path / "out")


def test_density_one_is_allowed():
    base, fts = make_family(2)
    got = tiesmerge.merge(base, fts, "ties", density=1.0)
    assert set(got) == set(base)


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -float("inf"), "1.0", None])
def test_lam_must_be_finite(tmp_path, lam):
    b, ms = _hf_family(tmp_path)
    with pytest.raises(ConfigError, match="lam must be a finite number"):
        tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", lam=lam)
    assert_no_output(tmp_path / "out")
    assert math.isfinite(tiesmerge.methods.Ties(lam=-2.0).lam)


def test_several_option_problems_reported_at_once():
    base, fts = make_family(2)
    with pytest.raises(ConfigError) as info:
        tiesmerge.merge(base, fts, "ties", density=2, lam=float("nan"), scope="layer")
    assert len(info.value.problems) == 3


def test_models_must_be_a_list():
    base, fts = make_family(2)
    for models in ([], fts[0], "ft0"):
        with pytest.raises(ConfigError, match="non-empty list"):
            tiesmerge.merge(base, models, "ties")


def test_same_state_dict_object_twice():
    base, fts = make_family(2)
    with pytest.raises(ConfigError, match="listed twice"):
        tiesmerge.merge(base, [fts[0], fts[0]], "ties")


def test_options_beside_a_method_object():
    base, fts = make_family(2)
    with pytest.raises(ConfigError, match="beside a method object"):
        tiesmerge.merge(base, fts, tiesmerge.methods.Ties(), density=0.5)


# ------------------------------------------------------------------ output location


def test_output_path_is_a_file(tmp_path):
    b, ms = _hf_family(tmp_path)
    out = tmp_path / "out"
    out.write_text("precious")
    for force in (False, True):
        with pytest.raises(OutputError, match="is a file") as info:
            tiesmerge.merge(b, ms, "ties", output=out, force=force)
        assert str(out) in str(info.value)
    assert out.read_text() == "precious"
    assert leftovers(out) == [out]


def test_output_under_a_file(tmp_path):
    b, ms = _hf_family(tmp_path)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out"
    with pytest.raises(OutputError, match="cannot create") as info:
        tiesmerge.merge(b, ms, "ties", output=out)
    assert str(out) in str(info.value)
    assert (tmp_path / "afile").read_text() == "x"


def test_output_directory_not_writable(tmp_path, monkeypatch):
    b, ms = _hf_family(tmp_path)
    parent = tmp_path / "locked"
    parent.mkdir()
    out = parent / "out"
    if os.geteuid() != 0:  # a real read-only parent
        parent.chmod(0o555)
        try:
            with pytest.raises(OutputError, match="cannot create") as info:
                tiesmerge.merge(b, ms, "ties", output=out)
        finally:
            parent.chmod(0o755)
    else:  # root ignores permissions: make creating the temporary directory fail as it would
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(writer_mod.tempfile, "mkdtemp", denied)
        with pytest.raises(OutputError, match="cannot create.*Permission denied") as info:
            tiesmerge.merge(b, ms, "ties", output=out)
    assert str(out) in str(info.value)
    assert "write" in (info.value.hint or "")
    assert_no_output(out)


# ------------------------------------------------------------------ interruption


class _Interrupt:
    """Wraps a method; raises KeyboardInterrupt on its call number ``after + 1``."""

    def __init__(self, real, after):
        self.real, self.after, self.calls = real, after, 0

    def method(self):
        def wrapper(obj, *args, **kwargs):
            self.calls += 1
            if self.calls > self.after:
                raise KeyboardInterrupt
            return self.real(obj, *args, **kwargs)

        return wrapper

    def function(self):
        def wrapper(*args, **kwargs):
            self.calls += 1
            if self.calls > self.after:
                raise KeyboardInterrupt
            return self.real(*args, **kwargs)

        return wrapper


@pytest.mark.parametrize("where", ["writer", "method"])
def test_interrupt_mid_write_leaves_nothing(tmp_path, monkeypatch, where):
    b, ms = _hf_family(tmp_path)
    if where == "writer":
        spy = _Interrupt(writer_mod.SafetensorsStreamWriter.write, after=4)
        monkeypatch.setattr(writer_mod.SafetensorsStreamWriter, "write", spy.method())
    elif kernels.available():  # the fused CPU kernel does TIES's arithmetic
        spy = _Interrupt(kernels.ties_merge, after=4)
        monkeypatch.setattr(kernels, "ties_merge", spy.function())
    else:
        spy = _Interrupt(tiesmerge.methods.Ties.merge, after=4)
        monkeypatch.setattr(tiesmerge.methods.Ties, "merge", spy.method())
    with pytest.raises(KeyboardInterrupt):
        tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", shard_size=600)
    assert spy.calls == 5  # some tensors were written before the interrupt
    assert_no_output(tmp_path / "out")


def test_interrupt_with_force_keeps_existing_output(tmp_path, monkeypatch):
    b, ms = _hf_family(tmp_path)
    out = tiesmerge.merge(b, ms, "average", output=tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    spy = _Interrupt(writer_mod.SafetensorsStreamWriter.write, after=3)
    monkeypatch.setattr(writer_mod.SafetensorsStreamWriter, "write", spy.method())
    with pytest.raises(KeyboardInterrupt):
        tiesmerge.merge(b, ms, "ties", output=out, force=True, shard_size=600)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == [out]


def test_error_after_weights_written_leaves_nothing(tmp_path, monkeypatch):
    """A failure in the last steps (copying config files) still removes the temporary directory."""
    b, ms = _hf_family(tmp_path)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tiesmerge.api.copy_model_files", broken)
    with pytest.raises(OutputError, match="the disk is full"):  # named: the output, and the space left there
        tiesmerge.merge(b, ms, "ties", output=tmp_path / "out")
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("which", ["base", "model", "parent"])
def test_output_that_is_or_contains_an_input_is_refused(tmp_path, which):
    b, ms = _hf_family(tmp_path)
    out = {"base": b, "model": ms[1], "parent": tmp_path}[which]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError, match="would replace an input of this command") as info:
        tiesmerge.merge(b, ms, "ties", output=out, force=True)
    assert str(out) in str(info.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # inputs untouched


def test_failed_merge_into_new_nested_folder_leaves_no_folders(tmp_path):
    base, fts = make_family(2)
    fts[1]["model.norm.weight"][0] = float("inf")
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    with pytest.raises(InvalidTensorError):
        tiesmerge.merge(b, ms, "ties", output=tmp_path / "new" / "deeper" / "out")
    assert not (tmp_path / "new").exists()
