"""Hostile pass 45 (issue 13), and the notes of pass 44 left for it."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import tiesmerge
from helpers_ckpt import make_family, write_hf_dir


def _family_dirs(tmp_path, n=2):
    base, fts = make_family(n)
    return [str(write_hf_dir(tmp_path / name, sd)) for name, sd in zip(("base", *[f"ft{k}" for k in range(n)]),
                                                                        (base, *fts))]


@pytest.mark.parametrize("budget, example", [("512MiB", "256MiB"), (None, "1024MiB"), ("3GiB", "1536MiB")])
def test_an_out_of_memory_hints_example_budget_is_below_the_one_in_use(tmp_path, monkeypatch, budget, example):
    """hp44 c09: a mapping refused under ``ulimit -v`` with ``--memory-budget 512MiB`` was hinted "give a smaller
    --memory-budget (e.g. 512MiB)": the budget just given. The example is half the budget in use, wherever the error
    is raised (the reader's mapping, the executor's allocation)."""
    from tiesmerge.engine import executor
    from tiesmerge.errors import OutOfMemoryError, memory_hint

    base, a, b = _family_dirs(tmp_path)
    options = {} if budget is None else {"memory_budget": budget}

    def mapping_refused(self, sink):
        raise OutOfMemoryError("x.safetensors: ran out of memory to map tensor 'w'", hint=memory_hint())

    monkeypatch.setattr(executor.Executor, "_run_with_threads", mapping_refused)
    with pytest.raises(OutOfMemoryError) as caught:
        tiesmerge.merge(base, [a, b], output=tmp_path / "out", **options)
    assert f"e.g. {example})" in caught.value.hint and not (tmp_path / "out").exists()

    def allocator_refused(self, sink):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(executor.Executor, "_run_with_threads", allocator_refused)
    with pytest.raises(OutOfMemoryError) as caught:
        tiesmerge.merge(base, [a, b], output=tmp_path / "out", **options)
    assert f"e.g. {example})" in caught.value.hint


def test_an_out_of_memory_hint_with_its_own_advice_keeps_it(tmp_path, monkeypatch):
    """The budget's example replaces only the general hint: an error whose hint says a budget cannot help (a mapping
    of a whole file refused) keeps that."""
    from tiesmerge.engine import executor
    from tiesmerge.errors import OutOfMemoryError

    base, a, b = _family_dirs(tmp_path)

    def own_advice(self, sink):
        raise OutOfMemoryError("x", hint="raise the address-space limit; a smaller --memory-budget cannot help")

    monkeypatch.setattr(executor.Executor, "_run_with_threads", own_advice)
    with pytest.raises(OutOfMemoryError, match="x") as caught:
        tiesmerge.merge(base, [a, b], output=tmp_path / "out", memory_budget="512MiB")
    assert caught.value.hint == "raise the address-space limit; a smaller --memory-budget cannot help"


def test_the_command_lines_out_of_memory_hint_halves_the_budget_given(tmp_path, monkeypatch, capsys):
    """hp44 c09, on the command line: memory running out outside the engine (a MemoryError in the command's own
    work) names half the --memory-budget given."""
    from tiesmerge.cli import commands
    from tiesmerge.cli.main import main

    def no_memory(args):
        raise MemoryError

    monkeypatch.setitem(commands.HANDLERS, "analyze", no_memory)
    assert main(["analyze", "--base", "b", "--model", "m", "-o", "o", "--memory-budget", "600MiB"]) == 1
    assert "e.g. 300MiB)" in capsys.readouterr().err


class _RefusingLoader:
    """An import whose module cannot be compiled: the MemoryError a tight ``ulimit -v`` gives inside importlib."""

    def find_spec(self, name, path=None, target=None):
        import importlib.util

        return importlib.util.spec_from_loader(name, self) if name == "_tm_heavy_library" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise MemoryError


@pytest.mark.parametrize("raised", ["import_error", "memory_error_in_import"])
def test_memory_running_out_while_torch_loads_is_said_to_be_the_limit_not_a_bug(monkeypatch, capsys, raised):
    """hp44 c31: under ``ulimit -v 450000`` torch's own import failed as "unexpected ImportError: libtorch_cpu.so:
    failed to map segment ... this is a bug in tiesmerge"; at 600000 as "torch/backends: ran out of memory ... give a
    smaller --memory-budget". Both are the address-space limit being smaller than the libraries, which no budget
    helps: said so, with the limit to raise."""
    import sys

    from tiesmerge.cli import commands
    from tiesmerge.cli.main import main

    def loads(args):
        if raised == "import_error":
            raise ImportError("libtorch_cpu.so: failed to map segment from shared object")
        import _tm_heavy_library  # noqa: F401

    finder = _RefusingLoader()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    monkeypatch.setitem(commands.HANDLERS, "analyze", loads)
    assert main(["analyze", "--base", "b", "--model", "m", "-o", "o", "--memory-budget", "600MiB"]) == 1
    err = capsys.readouterr().err
    assert "ran out of memory while loading a library" in err and "address-space limit" in err
    assert "raise the limit (ulimit -v" in err
    assert "bug" not in err and "--memory-budget" not in err


def _overflowing_recipe(tmp_path, method, extra=""):
    """A mergekit recipe whose float16 output overflows: two models of 40000s, weights 1 and 1."""
    from safetensors.torch import save_file

    for name, value in (("base", 0.0), ("m1", 40000.0), ("m2", 40000.0)):
        (tmp_path / name).mkdir()
        save_file({"model.layers.0.mlp.up_proj.weight": torch.full((4, 4), value)},
                  str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    base = f"base_model: {tmp_path / 'base'}\n" if method != "linear" else ""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: {method}\n{base}models:\n"
                      f"  - {{model: {tmp_path / 'm1'}, parameters: {{weight: 1.0}}}}\n"
                      f"  - {{model: {tmp_path / 'm2'}, parameters: {{weight: 1.0}}}}\n{extra}dtype: float16\n")
    return recipe


@pytest.mark.parametrize("method, extra", [("linear", "parameters: {normalize: false}\n"),
                                           ("task_arithmetic", "")])
def test_an_overflow_in_a_mergekit_recipe_is_hinted_in_the_recipes_terms(tmp_path, capsys, method, extra):
    """hp44 c23: a float16 mergekit linear recipe that overflowed was hinted "write a wider dtype (--dtype bfloat16 or
    float32), or use a smaller lam": the recipe has no lam, --lam and --dtype are refused over it. The hint names the
    recipe's dtype/out_dtype and its models' weights."""
    from tiesmerge.cli.main import main

    recipe = _overflowing_recipe(tmp_path, method, extra)
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "is not finite" in err and "set the recipe's out_dtype (or dtype) to bfloat16 or float32" in err
    assert "lower the models' weight (parameters.weight) in the recipe" in err
    assert "lam" not in err.split("hint:")[1] and "--dtype" not in err.split("hint:")[1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype, warned", [("float32", False), ("fp32", False), ("bfloat16", True)])
def test_mergekits_compute_dtype_is_warned_only_where_it_differs_from_float32(tmp_path, capsys, dtype, warned):
    """hp44 c33: a mergekit recipe with ``dtype: float32`` warned "arithmetic runs in float32 (mergekit computes in
    dtype=float32)": nothing differs, so nothing is said."""
    from test_recipe_mergekit_family import _family
    from tiesmerge.cli.main import main

    paths, _ = _family(tmp_path, n=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {paths['base']}\nmodels:\n"
                      f"  - {{model: {paths['m1']}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
                      f"  - {{model: {paths['m2']}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
                      f"dtype: {dtype}\n")
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert ("arithmetic runs in float32 (mergekit computes in" in capsys.readouterr().err) is warned


def test_classifier_accuracy_says_when_every_examples_logits_were_not_finite(tmp_path, bert_tokenizer):
    """hp44 c15: tune scored a merge whose every logit was NaN 0.0 (counted wrong, as hp43 c08 made it) and wrote it
    as its best without a word: the evaluator says how many examples had non-finite logits."""
    import warnings

    from test_hostile_fortieth_pass_evaluators import _bert_classifier
    from tiesmerge.errors import MergeWarning
    from tiesmerge.evaluation.builtin import ClassifierAccuracy

    model = _bert_classifier(tmp_path / "m", bert_tokenizer)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a cat", "label": 0}\n{"text": "a dog", "label": 1}\n')
    score = ClassifierAccuracy(tmp_path / "m", data)
    state = model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        assert 0.0 <= score(state) <= 1.0  # finite logits: nothing said
    broken = {k: v * float("nan") if v.is_floating_point() else v for k, v in state.items()}
    with pytest.warns(MergeWarning, match=r"classifier-accuracy: every one of the 2 examples had non-finite logits "
                                          r"\(Inf or NaN\) and were counted wrong"):
        assert score(broken) == 0.0


def test_choice_accuracy_says_when_examples_logits_were_not_finite(tmp_path):
    """hp44 c15, for choice-accuracy (the evaluator of the case: a Llama whose weights overflow its forward)."""
    from test_hostile_fortieth_pass_evaluators import _llama
    from tiesmerge.errors import MergeWarning
    from tiesmerge.evaluation.builtin import ChoiceAccuracy

    model = _llama(tmp_path / "lm")
    data = tmp_path / "ch.jsonl"
    data.write_text('{"prompt": "the cat", "choices": ["sat", "ran"], "label": 0}\n')
    score = ChoiceAccuracy(tmp_path / "lm", data)
    broken = {k: v * float("nan") if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with pytest.warns(MergeWarning, match=r"choice-accuracy: every one of the 1 examples had non-finite logits"):
        assert score(broken) == 0.0


def test_mergekits_long_model_references_are_read_as_their_short_form(tmp_path):
    """hp42 C33: mergekit's long form ``model: {model: {path: P}}`` (and ``lora: {path: L}``, read as ``P+L``) was
    refused as "a model is a path"; mergekit merges it. Read as the short form; what has no meaning for local folders
    (a hub revision, an architecture override) or is misspelt is refused, named."""
    import yaml
    from safetensors.torch import load_file

    from test_recipe_mergekit_family import _family
    from tiesmerge.cli.main import main
    from tiesmerge.errors import ConfigError
    from tiesmerge.recipe_mergekit import translate_mergekit

    paths, _ = _family(tmp_path, n=2)
    short = {"merge_method": "ties", "base_model": str(paths["base"]), "dtype": "float32",
             "parameters": {"density": 0.5, "weight": 1.0},
             "models": [{"model": str(paths["m1"])}, {"model": str(paths["m2"])}]}
    long = {**short, "base_model": {"model": {"path": str(paths["base"])}},
            "models": [{"model": {"model": {"path": str(paths["m1"]), "revision": None}}},
                       {"model": {"model": {"path": str(paths["m2"])}, "lora": None}}]}
    assert translate_mergekit(long)[0] == translate_mergekit(short)[0]
    outs = []
    for name, data in (("short", short), ("long", long)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
        assert main(["merge", str(tmp_path / f"{name}.yaml"), "-o", str(tmp_path / f"o_{name}"), "--no-progress"]) == 0
        outs.append(load_file(str(tmp_path / f"o_{name}" / "model.safetensors")))
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    with_lora = {**short, "models": [{"model": {"model": {"path": str(paths["base"])},
                                                "lora": {"path": str(tmp_path / "ad")}}}]}
    as_short = {**short, "models": [{"model": f"{paths['base']}+{tmp_path / 'ad'}"}]}
    assert translate_mergekit(with_lora)[0] == translate_mergekit(as_short)[0]
    bad = {**short, "models": [{"model": {"model": {"path": str(paths["m1"]), "revision": "main"}}},
                               {"model": {"model": {"path": str(paths["m2"])}, "override_architecture": "X",
                                          "colour": 1}},
                               {"model": {"model": "m3"}}]}
    with pytest.raises(ConfigError) as caught:
        translate_mergekit(bad)
    said = str(caught.value)
    assert "models[0].model.model: revision 'main' names a hub revision" in said
    assert "models[1].model: unknown key(s) colour" in said and "override_architecture is not read" in said
    assert "models[2].model.model: needs path: a folder" in said


def test_validate_checks_that_statistics_belong_to_their_models(tmp_path, capsys):
    """hp42 C42: ``tiesmerge validate`` said "ok — fisher of 2 models" for a recipe whose statistics were swapped
    between the models; the merge then refused them ("computed with another model"). validate checks them as the
    merge does (their models' files hashed, the digests remembered for the merge)."""
    from tiesmerge.cli.main import main
    from tiesmerge.stats import Statistics, StatsManifest, files_digest, save_stats

    base, models = make_family(2)
    write_hf_dir(tmp_path / "base", base)
    dirs = [write_hf_dir(tmp_path / f"ft{k}", m) for k, m in enumerate(models)]
    stats = [save_stats(tmp_path / f"fisher{k}", Statistics(StatsManifest("fisher", 1, model_digest=files_digest(
        dirs[k])), {n: torch.rand(v.shape) for n, v in base.items() if v.is_floating_point()})) for k in range(2)]
    recipe = tmp_path / "r.yaml"
    for order, code in (((0, 1), 0), ((1, 0), 1)):
        recipe.write_text(f"method: fisher\nbase: base\nmodels:\n  - {{path: ft0, stats: {stats[order[0]].name}}}\n"
                          f"  - {{path: ft1, stats: {stats[order[1]].name}}}\n")
        assert main(["validate", str(recipe)]) == code
        out = capsys.readouterr()
        if code:
            assert "fisher1: these statistics were computed with another model" in out.err and "ok" not in out.out
        else:
            assert "ok — fisher of 2 models" in out.out



def test_validate_names_every_bad_statistics_folder(tmp_path, capsys):
    """hp67a c46: validate of a fisher recipe named only the first bad ``stats:`` folder (or only a missing model, the
    statistics unnamed): the second showed on the next run. Every folder is opened on its own, as the models are."""
    from tiesmerge.cli.main import main

    base, models = make_family(2)
    write_hf_dir(tmp_path / "base", base)
    for k, m in enumerate(models):
        write_hf_dir(tmp_path / f"ft{k}", m)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: fisher\nbase: base\nmodels:\n  - {path: ft0, stats: nonexist1}\n"
                      "  - {path: ft1, stats: ft1}\n")  # a model folder: no statistics manifest
    assert main(["validate", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "nonexist1: not a statistics directory (no such path)" in err and re.search(r"ft1\b.*statistics", err)
    recipe.write_text("method: fisher\nbase: base\nmodels:\n  - {path: ft0, stats: nonexist1}\n"
                      "  - {path: nomodel, stats: nonexist2}\n")
    assert main(["validate", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "nomodel: no such file or directory" in err
    assert "nonexist1: not a statistics directory" in err and "nonexist2: not a statistics directory" in err


def test_one_statistics_folder_given_for_two_models_is_refused(tmp_path):
    """hp68a c29: a fisher merge given the same statistics folder for both models (computed through the API, so its
    digest could not be checked against either model's files) merged."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats import Statistics, StatsManifest, save_stats

    base, models = make_family(2)
    write_hf_dir(tmp_path / "base", base)
    dirs = [write_hf_dir(tmp_path / f"ft{k}", m) for k, m in enumerate(models)]
    shared = save_stats(tmp_path / "fisher", Statistics(StatsManifest("fisher", 1), {
        n: torch.rand(v.shape) for n, v in base.items() if v.is_floating_point()}))
    with pytest.raises(ConfigError, match=r"the statistics of model 1 \(.*fisher\) are those of model 0 \(the same "
                                          r"folder\)"):
        tiesmerge.merge(tmp_path / "base", dirs, "fisher", stats=[shared, tmp_path / "." / "fisher"],
                        output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [None, 5, 1.5, ["x"]])
def test_statistics_of_no_type_they_can_be_are_refused(tmp_path, bad):
    """hp69a c25-c27: stats=[dir, None] (or 5, 1.5, a list) and load_stats(None) were bare TypeErrors, and
    load_stats({"a": tensor}) a bare AssertionError."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats import load_stats

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    dirs = [write_hf_dir(tmp_path / f"ft{k}", m) for k, m in enumerate(models)]
    good = {n: torch.rand(v.shape) for n, v in base.items() if v.is_floating_point()}
    with pytest.raises(ConfigError, match=rf"stats\[1\]: a {type(bad).__name__} is no statistics"):
        tiesmerge.merge(b, dirs, "fisher", stats=[good, bad])
    with pytest.raises(ConfigError, match=f"load_stats reads a statistics directory, got {type(bad).__name__}"):
        load_stats(bad)
    with pytest.raises(ConfigError, match="load_stats reads a statistics directory, got dict"):
        load_stats(good)


def test_files_tiesmerge_writes_again_must_hold_json_numbers(tmp_path):
    """hp70a c34: a statistics manifest's options edited to NaN went into the merged model's tiesmerge.json (no JSON
    to strict readers); c46: an adapter config's lora_dropout Infinity into the merged adapter's config (PEFT's
    Dropout(p=inf) fails). Both are refused as damaged, naming the key."""
    import json

    from helpers_adapters import random_lora, write_lora_dir
    from tiesmerge.errors import CheckpointError
    from tiesmerge.stats import Statistics, StatsManifest, save_stats
    from tiesmerge.stats.files import open_stats

    base, models = make_family(2)
    folder = save_stats(tmp_path / "fisher", Statistics(StatsManifest("fisher", 1), {
        n: torch.rand(v.shape) for n, v in base.items() if v.is_floating_point()}))
    manifest = folder / "tiesmerge_stats.json"
    record = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**record, "options": {**record.get("options", {}), "a": float("nan")}}))
    with pytest.raises(CheckpointError, match=r"holds nan at options\.a, which is no JSON number"):
        open_stats(folder)
    b = write_hf_dir(tmp_path / "base", base)
    loras = [write_lora_dir(tmp_path / f"lora{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    config = json.loads((loras[1] / "adapter_config.json").read_text())
    (loras[1] / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": float("inf")}))
    with pytest.raises(CheckpointError, match="holds inf at lora_dropout"):
        tiesmerge.merge(b, loras, "ties", output=tmp_path / "out", output_format="adapter")
    assert not (tmp_path / "out").exists()


def test_a_model_twice_is_hinted_to_a_weight_only_where_the_method_takes_weights(tmp_path):
    """hp71a c49: "use weights= to count one more" was hinted for slerp, model_stock, fisher and analyze, which take
    no weights (following it failed)."""
    from tiesmerge.errors import ConfigError

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    m = write_hf_dir(tmp_path / "ft0", models[0])
    for method, hinted in (("ties", True), ("model_stock", False)):
        with pytest.raises(ConfigError, match="listed twice") as caught:
            tiesmerge.merge(b, [m, m], method, output=tmp_path / "out")
        assert ("to count one more" in caught.value.hint) == hinted, (method, caught.value.hint)
    with pytest.raises(ConfigError, match="listed twice") as caught:
        tiesmerge.analyze(b, [m, m])
    assert "to count one more" not in caught.value.hint

# ------------------------------------------------------------------ the evaluator digest (pass 45b)
_READS: list[str] = []  # what a user's code was asked: a digest that asks it could stall the search (or be caught)


class _Stalls:
    """Any attribute read through the object runs this class's code."""

    def __getattribute__(self, name):
        _READS.append(name)
        return object.__getattribute__(self, name)

    def __call__(self, state):
        return 1.0


class _StallsMissing:
    def __getattr__(self, name):
        _READS.append(name)
        raise AttributeError(name)

    def __call__(self, state):
        return 1.0


class _WrappedProperty:
    @property
    def __wrapped__(self):
        raise AssertionError("the digest read a __wrapped__ property")

    def __call__(self, state):
        return 1.0


class _PartialWithProperties(__import__("functools").partial):
    @property
    def func(self):
        raise AssertionError("the digest read a partial subclass's func property")

    @property
    def keywords(self):
        raise AssertionError("the digest read a partial subclass's keywords property")


class _Meta(type):
    pass


def _module_property(cls):
    raise AssertionError("the digest read a metaclass's __module__ property")


_Meta.__module__ = property(_module_property)  # every class of this metaclass: its __module__ runs this


class _OddClass(metaclass=_Meta):
    def __call__(self, state):
        return 1.0


def _signed(state, sign=1):
    return float(sign)


@pytest.mark.parametrize("make", [lambda: __import__("functools").partial(_Stalls()),
                                  lambda: __import__("functools").partial(_StallsMissing()),
                                  _WrappedProperty,
                                  lambda: _PartialWithProperties(_signed, sign=2),
                                  _OddClass,
                                  lambda: __import__("functools").partial(_OddClass())],
                         ids=["getattribute", "getattr", "wrapped_property", "partial_subclass", "metaclass",
                              "partial_of_metaclass"])
def test_the_evaluator_digest_reads_no_attribute_through_a_users_code(make):
    """hp45 c02: ``partial(E())`` where E's ``__getattribute__`` (or ``__getattr__``) sleeps, an object whose
    ``__wrapped__`` is a sleeping property, a partial subclass whose ``func`` is one: the digest read them through
    ``getattr`` and a search hung before its first candidate. Every read goes through the interpreter's own slots."""
    from tiesmerge.tuning.evaluator_digest import evaluator_objects, evaluator_state

    evaluate = make()
    _READS.clear()
    state = evaluator_state(evaluate)
    assert state is None or len(state) == 16
    assert evaluator_state(make()) == state  # and stable
    evaluator_objects(evaluate)
    assert _READS == []


def test_a_partial_subclass_is_digested_by_its_own_arguments():
    """The slots of a partial subclass are its real arguments: another sign is another digest."""
    from tiesmerge.tuning.evaluator_digest import evaluator_state

    assert evaluator_state(_PartialWithProperties(_signed, sign=2)) != \
        evaluator_state(_PartialWithProperties(_signed, sign=3))


def _data_kinds():
    import array
    import collections

    import numpy as np
    import pandas as pd
    from torch.utils.data import DataLoader, TensorDataset

    return {"loader": lambda v: DataLoader(TensorDataset(torch.zeros(4, 2), torch.full((4,), v)), batch_size=4),
            "dataset": lambda v: TensorDataset(torch.zeros(4, 2), torch.full((4,), v)),
            "dataframe": lambda v: pd.DataFrame({"y": [v] * 4}),
            "series": lambda v: pd.Series([v] * 4),
            "masked": lambda v: np.ma.MaskedArray([1.0, 2.0, 3.0], mask=[False, v > 1, False]),
            "deque": lambda v: collections.deque([v, v]),
            "array": lambda v: array.array("d", [v, v])}


@pytest.mark.parametrize("kind", list(_data_kinds()))
def test_validation_data_in_a_librarys_container_is_digested(kind):
    """hp45 c03: an evaluator built by ``make(data)`` over a DataLoader, a TensorDataset, a DataFrame, a masked array
    (another mask), a deque or an array.array resumed a search over other data silently, reporting the first data's
    scores: the digest was None (or ignored the mask) and nothing was warned. They are digested by their contents;
    the same data gives the same digest."""
    from tiesmerge.tuning.evaluator_digest import evaluator_state

    make_data = _data_kinds()[kind]

    def make(data):
        def score(state):
            return float(len(data))
        return score

    first, same, other = (evaluator_state(make(make_data(v))) for v in (1.0, 1.0, 5.0))
    assert first is not None and first == same and first != other


def test_a_resumed_search_over_other_data_in_a_dataframe_is_refused(tmp_path):
    """hp45 c03, end to end: the search log refuses the evaluator built over other validation data."""
    import pandas as pd

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base = {"w": torch.zeros(4, 4)}
    models = [{"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(i))} for i in range(2)]

    def make(data):
        def score(state):
            return float(data["y"].sum())
        return score

    log = tmp_path / "log.jsonl"
    grid = {"density": [0.2], "lam": [1.0]}
    run_search(base, models, "ties", make(pd.DataFrame({"y": [1.0] * 4})), grid=grid, log=log)
    with pytest.raises(ConfigError, match="what the evaluator was built with"):
        run_search(base, models, "ties", make(pd.DataFrame({"y": [5.0] * 4})), grid=grid, log=log)
    assert run_search(base, models, "ties", make(pd.DataFrame({"y": [1.0] * 4})), grid=grid, log=log).best.score == 4


def test_the_evaluator_digest_of_many_keys_keeps_to_its_budget():
    """hp45 c04: a default dict of 300,000 keys (i, S), S a shared 250-int tuple, took ~90 s before the first
    candidate: each key's sort order had a budget of its own outside the digest's. The keys' digests count against
    the digest's budget, so its time no longer grows with the keys past it."""
    import time

    from tiesmerge.tuning.evaluator_digest import evaluator_state

    shared = tuple(range(250))
    timings = []
    for n in (20_000, 200_000):
        table = {(i, shared): i for i in range(n)}

        def score(state, table=table):
            return 1.0

        started = time.perf_counter()
        assert evaluator_state(score) is not None
        timings.append(time.perf_counter() - started)
    # ten times the keys: far from ten times the time (before: 4.4 s and 36 s for 10k and 100k keys)
    assert timings[1] < 3 * timings[0] + 2.0, timings


# ------------------------------------------------------------------ merge side (pass 45a)
def test_a_plugin_returning_a_meta_or_sparse_tensor_is_a_method_error(tmp_path):
    """hp45 c09: a plugin method returning a tensor on the meta device failed as "unexpected RuntimeError:
    Tensor.item() cannot be called on meta tensors ... a bug in tiesmerge" (a bare RuntimeError in the API). A result
    on another device, or not dense, is a MethodError naming the method and the tensor."""
    from test_hostile_fortysecond_pass import _method_of
    from tiesmerge.errors import MethodError

    base, a, b = _family_dirs(tmp_path)
    for name, merge_fn, said in (("meta", lambda tau: torch.empty(tau.shape[1:], device="meta"), "a meta tensor"),
                                 ("sparse", lambda tau: tau.sum(0).to_sparse(), "a sparse_coo tensor")):
        for out in (None, tmp_path / "out"):
            with pytest.raises(MethodError, match=rf"method '{name}' \(.*Custom\) returned {said} for tensor"):
                tiesmerge.merge(base, [a, b], _method_of(merge_fn, name), output=out)
    assert not (tmp_path / "out").exists()


def test_every_path_of_the_api_may_be_bytes(tmp_path, monkeypatch):
    """hp45 c24: ``save_stats(b"out/stats_\\xff", st)`` was a bare TypeError (merge takes bytes paths, as the README's
    Safety section says of the API); load_stats, merge(stats=[bytes]), run_search(log=bytes) and tune's and
    run_search's bytes base and models were too."""
    import os

    from tiesmerge.stats import Statistics, StatsManifest, files_digest, load_stats, save_stats
    from tiesmerge.tuning import run_search

    monkeypatch.chdir(tmp_path)
    base, models = make_family(2)
    dirs = [write_hf_dir(tmp_path / name, sd) for name, sd in (("base", base), ("ft0", models[0]), ("ft1", models[1]))]
    raw = [os.fsencode(str(d)) for d in dirs]
    floats = {n: torch.rand(v.shape) for n, v in base.items() if v.is_floating_point()}
    written = [save_stats(b"stats_\xff%d" % k, Statistics(StatsManifest("fisher", 1, model_digest=files_digest(
        raw[k + 1])), floats)) for k in range(2)]
    assert written[0].name == os.fsdecode(b"stats_\xff0") and load_stats(b"stats_\xff0").tensors.keys() == floats.keys()
    tiesmerge.merge(raw[0], raw[1:], "fisher", stats=[b"stats_\xff0", b"stats_\xff1"], output=b"out")
    grid = {"density": [0.2], "lam": [1.0]}
    run_search(raw[0], raw[1:], "ties", lambda state: 1.0, grid=grid, log=b"log_\xff.jsonl")
    assert os.path.isfile(b"log_\xff.jsonl")
    assert tiesmerge.tune(raw[0], raw[1:], "ties", lambda state: 1.0, grid=grid).best.score == 1.0


def _replace_weights(model_dir, scratch, factor=3.0):
    """The model's weights file replaced by rename, as a download or a training run saving would."""
    import os

    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    save_file({k: v * factor for k, v in weights.items()}, os.path.join(scratch, "new.safetensors"))
    os.replace(os.path.join(scratch, "new.safetensors"), os.path.join(model_dir, "model.safetensors"))


def test_a_model_replaced_during_tunes_last_evaluation_stops_it(tmp_path):
    """hp45 c18: tune's evaluator replacing a model at its last call: tune checked the inputs after each merge, not
    after the last evaluation, and ``tune -o`` wrote its best merged again from the new files (the manifest naming
    them). The inputs are checked once more when the grid is done."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.tuning import tune

    base, a, b = _family_dirs(tmp_path)
    calls = []

    def evaluate(state):
        calls.append(1)
        if len(calls) == 2:  # the last point
            _replace_weights(b, tmp_path)
        return float(len(calls))

    with pytest.raises(CheckpointError, match=r"ft1: model 1 changed while tune ran"):
        tune(base, [a, b], "ties", evaluate, grid={"density": (0.2, 0.5), "lam": (1.0,)})


def test_a_model_replaced_while_adapt_learns_stops_it_before_the_merge(tmp_path):
    """hp45 c17: a model replaced 16 s into a 28 s adapt run: the coefficients learned on the old model were applied
    to the new one's files, the manifest recording its digest, exit 0. adapt stops, naming the model, before its
    merge."""
    from test_adapt_hostile import _encode, _net, _setup
    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation.forward import FunctionLogits

    base, fts, files = _setup(tmp_path)
    base, *fts = [str(write_hf_dir(tmp_path / name, sd)) for name, sd in zip(("b", "m1", "m2"), (base, *fts))]
    calls = []

    def logits(module, batch, task):
        calls.append(1)
        if len(calls) == 3:
            _replace_weights(fts[0], tmp_path)
        return module(batch)

    with pytest.raises(CheckpointError, match=r"m1: model 0 changed while adapt ran .* the coefficients were learned "
                                              r"on the model as it was"):
        tiesmerge.adapt(base, fts, files, forward=FunctionLogits(_net(), logits, encode=_encode), steps=4,
                        output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["1:30", "1:00", "-2:30.5", "190:20:30"])
def test_a_base_60_number_in_a_recipe_is_refused(tmp_path, value):
    """hp45 c33: YAML 1.1 reads ``lam: 1:30`` as 90 and ``weight: 1:00`` as 60: merged with lam 90 and weights
    [60, 90], exit 0, no warning. Such a value is refused, naming its line; quoted, it is text."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.limits import loads_yaml

    with pytest.raises(ConfigError, match=rf"r\.yaml: {value} \(line 2\) reads in YAML 1\.1 as a base-60 number"):
        loads_yaml(f"method: ties\nparameters: {{lam: {value}}}\n", source="r.yaml", error=ConfigError)
    assert loads_yaml(f"name: '{value}'\nother: 1.5\n", source="r.yaml") == {"name": value, "other": 1.5}


@pytest.mark.parametrize("how", ["exit", "nan"])
def test_a_plugin_that_exits_or_returns_nan_is_named(tmp_path, capsys, how):
    """hp45 c10: a plugin method calling sys.exit(3) inside merge ended the command with exit 3 and no message;
    c11: one returning NaN from finite inputs was "the merge overflowed ... use a smaller lam". Both are a MethodError
    naming the method and the tensor."""
    from test_hostile_fortysecond_pass import _method_of
    from tiesmerge.errors import MethodError

    base, a, b = _family_dirs(tmp_path)

    def misbehaves(tau):
        if how == "exit":
            raise SystemExit(3)
        return torch.full(tau.shape[1:], float("nan"))

    said = r"called sys\.exit\(3\) on tensor" if how == "exit" else r"returned \d+ non-finite value\(s\) \(Inf or NaN\)"
    with pytest.raises(MethodError, match=rf"method 'evil' \(.*Custom\) {said}"):
        tiesmerge.merge(base, [a, b], _method_of(misbehaves, "evil"), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", [0, "-1GB", "lots"])
def test_save_stats_refuses_a_bad_shard_size_as_merge_does(tmp_path, size):
    """hp45 c25: ``save_stats(..., shard_size=0)`` raised a plain ValueError ("size must be a positive ..."), where
    ``merge(shard_size=0)`` gives a ConfigError naming shard_size."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats import Statistics, StatsManifest, save_stats

    with pytest.raises(ConfigError, match="shard_size: "):
        save_stats(tmp_path / "s", Statistics(StatsManifest("fisher", 1), {"w": torch.ones(2)}), shard_size=size)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("which", ["weights_file", "adapter"])
def test_files_from_that_holds_no_config_is_refused(tmp_path, which):
    """hp45 c05: ``files_from`` naming a model given as a .safetensors file (or a folder without config.json, an
    adapter's) merged with exit 0, the output without config.json or tokenizer, the warning blaming the base. It is
    refused, naming files_from."""
    import shutil

    from tiesmerge.errors import ConfigError

    base, a, b = _family_dirs(tmp_path)
    (tmp_path / "base" / "config.json").write_text('{"model_type": "llama"}')
    if which == "weights_file":
        model = str(tmp_path / "ft1" / "model.safetensors")
    else:
        model = str(tmp_path / "bare")
        shutil.copytree(b, model)
        for extra in os.listdir(model):
            if extra != "model.safetensors":
                os.remove(os.path.join(model, extra))
    with pytest.raises(ConfigError, match=r"files_from '.*' is a (weights file|folder without config\.json): the "
                                          r"output's config\.json and tokenizer files are copied from a model folder"):
        tiesmerge.merge(base, [a, model], output=tmp_path / "out", files_from=model)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "validate"])
def test_a_mergekit_recipes_vocabulary_hint_names_tokenizer_source(tmp_path, capsys, command):
    """hp45 c04: a mergekit recipe whose models' vocabularies differ was refused with "--vocab-policy union ...
    --vocab-policy truncate", flags refused over a mergekit recipe (whose refusal then said to change merge_method).
    The hint names the recipe's tokenizer_source."""
    from safetensors.torch import load_file, save_file

    from test_recipe_mergekit_family import _family
    from tiesmerge.cli.main import main

    paths, _ = _family(tmp_path, n=2)
    for name in ("m1", "m2"):
        weights = load_file(str(paths[name] / "model.safetensors"))
        weights["model.embed_tokens.weight"] = torch.cat([weights["model.embed_tokens.weight"], torch.ones(2, 6)])
        save_file(weights, str(paths[name] / "model.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {paths['base']}\nmodels:\n  - model: {paths['base']}\n"
                      f"  - model: {paths['m1']}\nparameters: {{t: 0.5}}\ndtype: float32\n")
    args = ["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"] if command == "merge" else \
        ["validate", str(recipe)]
    assert main(args) != 0
    hint = capsys.readouterr().err.split("hint:")[-1]
    assert "tokenizer_source: union in the recipe" in hint and "tokenizer_source: base in the recipe" in hint
    assert "--vocab-policy" not in hint
    # a tiesmerge merge of the same models still names the flag
    assert main(["merge", "--base", str(paths["base"]), "--model", str(paths["m1"]), "--model", str(paths["m2"]),
                 "-o", str(tmp_path / "out")]) != 0
    assert "--vocab-policy union" in capsys.readouterr().err


def test_a_mergekit_linear_recipe_without_dtype_says_its_output_is_not_base_models_dtype(tmp_path, capsys):
    """hp45 c30: a linear recipe whose base_model is bfloat16 and whose models are float32 is written float32 (as
    mergekit promotes); the warning every other method gives was missing, since the engine's base (the first listed
    model) is float32 already, and the README said the output takes base_model's dtype."""
    from safetensors.torch import load_file, save_file

    from test_hostile_fortysecond_pass import _linear_recipe
    from tiesmerge.cli.main import main

    recipe, paths, states = _linear_recipe(tmp_path)
    save_file({k: v.bfloat16() for k, v in states["base"].items()}, str(paths["base"] / "model.safetensors"))
    recipe.write_text(recipe.read_text().replace("dtype: float32\n", ""))
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "no dtype given: the output is float32, the models' dtypes promoted" in capsys.readouterr().err
    assert {v.dtype for v in load_file(str(tmp_path / "out" / "model.safetensors")).values()} == {torch.float32}


@pytest.mark.parametrize("method, said", [("model_stock", None),
                                          ("task_arithmetic", "a larger weight (models[i].parameters.weight in the "
                                                              "recipe)")])
def test_a_model_listed_twice_in_a_mergekit_recipe_is_hinted_in_its_terms(tmp_path, capsys, method, said):
    """hp45 c12: a mergekit model_stock listing one model twice was hinted "use --weights to count one more":
    --weights is refused over a mergekit recipe, and model_stock has no weights."""
    from test_recipe_mergekit_family import _family
    from tiesmerge.cli.main import main

    paths, _ = _family(tmp_path, n=1)
    recipe = tmp_path / "r.yaml"
    weight = ", parameters: {weight: 1.0}" if method == "task_arithmetic" else ""
    recipe.write_text(f"merge_method: {method}\nbase_model: {paths['base']}\nmodels:\n"
                      f"  - {{model: {paths['m1']}{weight}}}\n  - {{model: {paths['m1']}{weight}}}\ndtype: float32\n")
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "is listed twice" in err and "--weights" not in err
    assert (f"use {said} to count one more" in err) if said else ("count one more" not in err)


def test_a_lora_on_a_refused_base_model_is_not_said_to_have_no_base_model(tmp_path, capsys):
    """hp45 c28: a mergekit slerp whose base_model is BASE+LORA (refused) and whose model is BASE+LORA: the second
    problem said "the recipe has no base_model; add base_model: ...", and a third that BASE+LORA was no such file."""
    from test_recipe_mergekit_family import _family
    from tiesmerge.cli.main import main

    paths, _ = _family(tmp_path, n=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {paths['base']}+{tmp_path / 'l1'}\n"
                      f"models:\n  - model: {paths['base']}+{tmp_path / 'l2'}\nparameters: {{t: 0.3}}\n")
    assert main(["validate", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "base_model: " in err and "applies an adapter to the base itself" in err
    assert "has no base_model" not in err and "no such file" not in err
    assert "the recipe's is refused above" in err


@pytest.mark.parametrize("extra, said", [
    (["--init", "0.3", "--clamp", "0.31", "1"], r"init 0\.3 lies outside clamp"),
    (["--method", "ties", "--densities", "0.2"], r"densities"),
    (["--choices", "CHOICES"], r"--choices applies to --forward choice"),
    (["--heads", "CHOICES"], r"--heads applies to --forward encoder"),
    (["--task-names", "only_one"], r"1 task name\(s\) for 2 data file\(s\)"),  # hp46 c10
])
def test_an_adapt_dry_run_refuses_what_the_run_refuses_before_its_work(classifiers, tmp_path, capsys, extra, said):
    """hp45 c06: ``adapt --dry-run`` with settings the real run refuses at once (--init outside --clamp, --densities
    of the wrong count, --choices or --heads for the classifier forward) printed its plan and exited 0. It makes the
    same checks, before its plan."""
    from helpers_ckpt import run_cli
    from test_hostile_fourth_pass_adapt import _adapt

    (tmp_path / "c.json").write_text('{"task0": ["yes", "no"]}')
    argv, _ = _adapt(classifiers, tmp_path, "--dry-run", *[str(tmp_path / "c.json") if e == "CHOICES" else e
                                                           for e in extra])
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and re.search(said, err), err
    assert "coefficients" not in out


# ------------------------------------------------------------------ tune side, the later cases (pass 45b)
class _SlotFloat(float):
    __slots__ = ("sign",)


class _SignedBytes(bytearray):
    pass


class _SignedComplex(complex):
    pass


class _SignedPath(type(__import__("pathlib").PurePosixPath())):
    pass


@pytest.mark.parametrize("make", [lambda: _SlotFloat(1.0), lambda: _SignedBytes(b"x"), lambda: _SignedComplex(1),
                                  lambda: _SignedPath("a")], ids=["slots_float", "bytearray", "complex", "path"])
def test_a_value_subclass_carrying_a_setting_is_digested_with_it(make):
    """hp45 c32: a float subclass whose __slots__ hold ``sign``, a bytearray, complex or PurePosixPath subclass with a
    ``.sign``: the digest read the value only, so a search resumed with sign -1 reused the +1 run's scores."""
    from tiesmerge.tuning.evaluator_digest import evaluator_state

    def evaluator(sign):
        held = make()
        held.sign = sign

        def score(state):
            return float(held.sign)
        return score

    assert evaluator_state(evaluator(1)) == evaluator_state(evaluator(1))
    assert evaluator_state(evaluator(1)) != evaluator_state(evaluator(-1))


def test_an_evaluator_module_that_changes_torchs_defaults_at_import_is_put_back(tmp_path, monkeypatch, capsys):
    """hp45 c35: an evaluator module calling torch.set_default_device("meta") as it is imported (not in a call) made
    the merges fail as "unexpected RuntimeError: Tensor.item() cannot be called on meta tensors ... a bug in
    tiesmerge": the guard restored the defaults around calls only."""
    from tiesmerge.cli.main import main

    base, a, b = _family_dirs(tmp_path)
    (tmp_path / "meta_eval.py").write_text("import torch\ntorch.set_default_device('meta')\n"
                                           "torch.set_default_dtype(torch.float64)\n"
                                           "def score(state):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["tune", "--base", base, "--model", a, "--model", b, "--evaluator", "meta_eval:score",
                     "--grid", "density=0.2", "--grid", "lam=1.0", "-o", str(tmp_path / "out")]) == 0
        assert "meta_eval:score's module changed torch's default device or dtype" in capsys.readouterr().err
        assert torch.get_default_device() == torch.device("cpu") and torch.get_default_dtype() == torch.float32
    finally:
        torch.set_default_device(None)
        torch.set_default_dtype(torch.float32)


def test_an_evaluator_file_shadowed_by_a_module_python_has_is_said(tmp_path, monkeypatch, capsys):
    """hp45 c14: ``--evaluator json:score`` with a json.py in the working folder: "cannot load it (AttributeError:
    module 'json' has no attribute 'score') / hint: the module must be importable from here (run from its folder
    ...)": the user was in its folder. The message says the standard module shadows the file, and to rename it."""
    from tiesmerge.cli.main import main

    base, a, b = _family_dirs(tmp_path)
    (tmp_path / "json.py").write_text("def score(state):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--base", base, "--model", a, "--model", b, "--evaluator", "json:score",
                 "--grid", "density=0.2", "--grid", "lam=1.0"]) == 2
    err = capsys.readouterr().err
    assert "json.py in the working folder is shadowed by the module 'json'" in err
    assert "rename your file (e.g. my_json.py) and pass --evaluator my_json:score" in err


def test_task_names_holding_dollars_are_drawn_as_written(tmp_path):
    """hp45 c39: adapt --task-names '$x^{$' y ran every step, then failed as "unexpected ValueError ... a bug in
    tiesmerge" drawing the coefficients' heat map (matplotlib's mathtext), and wrote nothing."""
    from test_adapt_hostile import _forward, _setup

    base, fts, files = _setup(tmp_path)
    out = tiesmerge.adapt(base, fts, files, forward=_forward(), steps=2, tasks=["$x^{$", "$\\frac{a b"],
                          output=tmp_path / "out").output
    assert (out / "adamerging_coefficients.png").is_file() and (out / "adamerging_entropy.png").is_file()


def _with_st_modules(folder, pooling_path="1_Pooling", pooling=None, extra=()):
    """``folder`` made a sentence-transformers folder: its modules.json (a Transformer, a Pooling module at
    ``pooling_path``, then ``extra`` modules) and, where ``pooling`` is given, the Pooling module's config.json."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": pooling_path, "type": "sentence_transformers.models.Pooling"}, *extra]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / pooling_path).mkdir()
    if pooling is not None:
        (folder / pooling_path / "config.json").write_text(json.dumps(pooling))
    return folder / pooling_path


def test_a_sentence_transformers_pooling_changed_between_runs_is_another_search(tmp_path, bert_tokenizer):
    """hp45 c46: a search with encoder-accuracy on a sentence-transformers folder resumed silently after its
    1_Pooling/config.json switched from mean to CLS pooling (the scores differ: 0.4667 and 0.5167). The modules'
    settings count among the base's files."""
    from test_hostile_fortysecond_pass import _encoder_dir
    from tiesmerge.tuning.driver import weights_stamp

    model = _encoder_dir(tmp_path, bert_tokenizer)
    _with_st_modules(model, pooling={"pooling_mode_mean_tokens": True})
    before = weights_stamp([model])
    (model / "checkpoint-5").mkdir()  # a trainer's folder beside it changes nothing
    (model / "checkpoint-5" / "trainer_state.json").write_text("{}")
    assert weights_stamp([model]) == before
    (model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert weights_stamp([model]) != before


def test_a_tokenizer_rewritten_during_tunes_last_evaluation_stops_it(tmp_path):
    """hp45 c70: as c18, with the base's tokenizer.json rewritten (a token added) at the last evaluation: tune -o wrote
    a tokenizer the scored candidates never had."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.tuning import tune

    base, a, b = _family_dirs(tmp_path)
    (tmp_path / "base" / "tokenizer.json").write_text('{"added_tokens": []}')
    calls = []

    def evaluate(state):
        calls.append(1)
        if len(calls) == 2:
            (tmp_path / "base" / "tokenizer.json").write_text('{"added_tokens": ["[EVIL]"]}')
        return 1.0

    with pytest.raises(CheckpointError, match=r"base: the base changed while tune ran"):
        tune(base, [a, b], "ties", evaluate, grid={"density": (0.2, 0.5), "lam": (1.0,)})


def test_under_a_tight_address_space_the_kernels_run_on_one_thread(tmp_path, monkeypatch):
    """hp45 c41, c48: a 3 x 128 MB merge under ``ulimit -v 500000`` hung in numba's count kernel (SIGTERM unheeded),
    and through the API libgomp ended the caller's process ("Thread creation failed", exit 1, no exception, the
    temporary folder left). Below 2 GiB of address space the kernels and torch run on one thread, which starts none;
    the merge is the same, and the thread counts are put back."""
    from tiesmerge.engine import fused

    base, a, b = _family_dirs(tmp_path)
    wide = tiesmerge.merge(base, [a, b])
    threads = torch.get_num_threads()
    monkeypatch.setattr(fused, "address_space_limit", lambda: 500_000 << 10)
    with fused.one_thread_when_tight():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
    tight = tiesmerge.merge(base, [a, b])
    assert all(torch.equal(wide[k], tight[k]) for k in wide)
    assert torch.get_num_threads() == threads
    monkeypatch.setattr(fused, "address_space_limit", lambda: None)
    with fused.one_thread_when_tight():
        assert torch.get_num_threads() == threads


def test_functions_and_partials_in_a_list_are_digested_by_what_they_were_built_with():
    """hp45 c74: a closure holding ``[functools.partial(acc, threshold=th)]`` (or a default tuple of such partials)
    had the same digest for th 0.5 and 0.9: inside a list a partial was read as an object, its arguments left out."""
    import functools

    from tiesmerge.tuning.evaluator_digest import evaluator_state

    def accuracy(state, threshold):
        return threshold

    def make(threshold, how):
        metrics = [functools.partial(accuracy, threshold=threshold)] if how == "partial" else \
            [(lambda state, t=threshold: t)]

        def score(state):
            return metrics[0](state)
        return score

    for how in ("partial", "lambda"):
        assert evaluator_state(make(0.5, how)) == evaluator_state(make(0.5, how))
        assert evaluator_state(make(0.5, how)) != evaluator_state(make(0.9, how))


def test_adapts_label_past_a_rows_own_choices_is_refused_before_the_first_step(tmp_path):
    """hp45 c78: adapt --forward choice --objective cross_entropy with rows of 3 and 2 choices, the 2-choice row
    labelled 2: "unexpected IndexError: Target 2 is out of bounds ... a bug in tiesmerge" in the first step (the
    check used the task's largest choice count)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from test_hostile_fortieth_pass_evaluators import _llama
    from tiesmerge.errors import ConfigError

    _llama(tmp_path / "base")
    for name, factor in (("m1", 1.01), ("m2", 0.99)):
        shutil.copytree(tmp_path / "base", tmp_path / name)
        weights = load_file(str(tmp_path / name / "model.safetensors"))
        save_file({k: v * factor for k, v in weights.items()}, str(tmp_path / name / "model.safetensors"),
                  metadata={"format": "pt"})
    rows = [{"text": "the cat", "choices": ["sat", "ran", "on"], "label": 0},
            {"text": "the dog", "choices": ["sat", "ran"], "label": 2}]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"example 2's label 2 is past its own 2 choices \(0 \.\. 1\)"):
        tiesmerge.adapt(tmp_path / "base", [tmp_path / "m1", tmp_path / "m2"], [data, data], forward="choice",
                        objective="cross_entropy", steps=1, tasks=["a", "b"])


def _digested_apart(first, other):
    """An evaluator closing over ``first()``: digested alike each time it is made, and apart from one closing over
    ``other()``."""
    from tiesmerge.tuning.evaluator_digest import evaluator_state

    def make(value):
        def score(state):
            return float(value is not None)
        return score

    assert evaluator_state(make(first())) is not None
    assert evaluator_state(make(first())) == evaluator_state(make(first()))
    assert evaluator_state(make(first())) != evaluator_state(make(other()))


@pytest.mark.parametrize("first, other", [
    (lambda: __import__("re").compile("a"), lambda: __import__("re").compile("a", __import__("re").I)),
    (lambda: __import__("datetime").date(2020, 1, 1), lambda: __import__("datetime").date(2020, 1, 2)),
    (lambda: __import__("datetime").timedelta(1), lambda: __import__("datetime").timedelta(2))],
    ids=["pattern", "date", "timedelta"])
def test_a_pattern_or_a_date_in_a_closure_is_digested(first, other):
    """hp45 c03 (its later part): a compiled pattern, a date or a duration held in an evaluator's closure was neither
    digested nor warned of."""
    _digested_apart(first, other)


def test_an_adapt_checkpoint_another_run_replaces_stops_this_run(tmp_path):
    """hp45 c66: two adapt runs on one -o at once both wrote o.adapt-checkpoint.safetensors for 28 s; the first wrote
    the output and said "--resume continues from it", but the checkpoint was the second's, whose refusal came only
    at its end. A run finding its checkpoint replaced by another stops at its next save, before its merge."""
    import shutil

    from test_adapt_hostile import _encode, _net, _setup
    from tiesmerge.errors import OutputError
    from tiesmerge.evaluation.forward import FunctionLogits

    base, fts, files = _setup(tmp_path)
    ck = tmp_path / "ck.safetensors"
    calls = []

    def logits(module, batch, task):
        calls.append(1)
        if len(calls) == 5 and ck.exists():  # another run's save: a new file renamed over it
            shutil.copy(ck, tmp_path / "other.safetensors")
            os.replace(tmp_path / "other.safetensors", ck)
        return module(batch)

    with pytest.raises(OutputError, match=r"ck\.safetensors: the checkpoint was replaced by another process"):
        tiesmerge.adapt(base, fts, files, forward=FunctionLogits(_net(), logits, encode=_encode), steps=6,
                        checkpoint=ck, checkpoint_every=1, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # alone, the same run saves at every step and ends
    tiesmerge.adapt(base, fts, files, forward=FunctionLogits(_net(), lambda m, b, task: m(b), encode=_encode),
                    steps=3, checkpoint=tmp_path / "ck2.safetensors", checkpoint_every=1)


@pytest.mark.parametrize("case", ["dense", "fifo"])
def test_sentence_transformers_settings_the_encoder_cannot_follow_are_said(tmp_path, bert_tokenizer, case):
    """hp45 c34: a sentence-transformers folder of Transformer -> Pooling -> Dense -> Normalize was scored without its
    Dense, no word; c61: one whose 1_Pooling/config.json is a FIFO was scored with mean pooling, no word."""
    from test_hostile_fortysecond_pass import _encoder_dir
    from tiesmerge.errors import MergeWarning
    from tiesmerge.evaluation.encoder import pooling_of

    model = _encoder_dir(tmp_path, bert_tokenizer)
    extra = [{"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
             {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"}]
    _with_st_modules(model, extra=extra if case == "dense" else ())
    if case == "fifo":
        os.mkfifo(model / "1_Pooling" / "config.json")
        said = r"pooling settings cannot be read .*: it is scored with mean pooling"
    else:
        (model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
        said = r"modules Dense are not applied by tiesmerge's encoder"
    with pytest.warns(MergeWarning, match=said):
        assert pooling_of(model) == "mean"


def test_mergekits_tokenizer_source_block_is_read_as_tokenizer_source():
    """hp45 c37: mergekit's ``tokenizer: {source: base}`` (its newer spelling, which its own errors recommend) was
    refused as "tokenizer surgery"; it is read as ``tokenizer_source: base``. Its other settings stay refused."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.recipe_mergekit import translate_mergekit

    recipe = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m1", "parameters": {"weight": 1.0}}],
              "parameters": {"density": 0.5}}
    assert translate_mergekit({**recipe, "tokenizer": {"source": "base"}})[0] == \
        translate_mergekit({**recipe, "tokenizer_source": "base"})[0]
    with pytest.raises(ConfigError, match=r"tokenizer: is read only as \{source: base\}"):
        translate_mergekit({**recipe, "tokenizer": {"source": "base", "tokens": {"<x>": {"source": "m1"}}}})
    with pytest.raises(ConfigError, match=r"tokenizer\.source 'base' and tokenizer_source 'union' disagree"):
        translate_mergekit({**recipe, "tokenizer": {"source": "base"}, "tokenizer_source": "union"})


def test_dare_linear_without_rescale_is_read_at_density_1():
    """hp45 c50: mergekit's dare_linear with ``rescale: false`` was refused, though at density 1 nothing is dropped
    (the README lists rescale among the parameters read). Read there; below density 1 refused, saying why."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.recipe_mergekit import translate_mergekit

    recipe = {"merge_method": "dare_linear", "base_model": "b",
              "models": [{"model": "m1", "parameters": {"weight": 0.5}},
                         {"model": "m2", "parameters": {"weight": 0.5}}]}
    assert translate_mergekit({**recipe, "parameters": {"rescale": False}})[0] == translate_mergekit(recipe)[0]
    with pytest.raises(ConfigError, match=r"rescale: false .* is not supported at density 0\.5"):
        translate_mergekit({**recipe, "parameters": {"rescale": False, "density": 0.5}})


def test_method_over_a_recipe_with_per_model_weights_leaves_them_out_when_it_takes_none(tmp_path, capsys):
    """hp45 c35: ``--method slerp`` over a ties recipe whose models carry weights warned that density, lam and scope
    were left out, then failed with "slerp: unknown option 'weights'" (the recipe has models[].weight, never
    'weights'). A method that takes no weights leaves them out, said; one that does keeps them."""
    from tiesmerge.cli.main import main

    base, a, b = _family_dirs(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {base}\nmodels:\n  - {{path: {a}, weight: 0.7}}\n"
                      f"  - {{path: {b}, weight: 0.3}}\nparameters: {{density: 0.4}}\n")
    assert main(["merge", str(recipe), "--method", "slerp", "-o", str(tmp_path / "o1")]) == 0
    assert "--method slerp, which takes no weights, leaves out the recipe's per-model weight" in \
        capsys.readouterr().err
    assert main(["merge", str(recipe), "--method", "task_arithmetic", "-o", str(tmp_path / "o2")]) == 0
    assert "per-model weight" not in capsys.readouterr().err


@pytest.mark.parametrize("code, raised", [("def score(state:\n", "SyntaxError"),
                                          ("import sys\nsys.exit(0)\n", "SystemExit"),
                                          ("import no_such_package_zz\n", "ModuleNotFoundError")])
def test_an_evaluator_module_whose_code_fails_at_import_is_told_to_fix_it(tmp_path, monkeypatch, capsys, code,
                                                                           raised):
    """hp45 c64: evaluator modules failing as they are imported (a SyntaxError, sys.exit, a missing dependency) were
    hinted "the module must be importable from here (run from its folder ...)": it was found, its code failed."""
    from tiesmerge.cli.main import main

    base, a, b = _family_dirs(tmp_path)
    name = f"broken_{raised.lower()}"
    (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--base", base, "--model", a, "--model", b, "--evaluator", f"{name}:score"]) == 2
    err = capsys.readouterr().err
    assert f"importing '{name}' ran its code, which raised {raised}" in err
    assert f"fix the module ({tmp_path / name}.py)" in err and "importable from here" not in err


def test_validate_refuses_an_adapter_rank_the_merge_refuses(lora_family, tmp_path, capsys):
    """hp45 c66: ``tiesmerge validate`` said ok for a recipe writing a LoRA adapter at rank 1000, which the merge
    refuses at once ("more than the largest rank any adapted matrix has")."""
    from tiesmerge.cli.main import main

    _, base, dirs, _ = lora_family
    recipe = tmp_path / "r.yaml"
    body = f"method: ties\nbase: {base}\nmodels: [{dirs[0]}, {dirs[1]}]\noutput_format: adapter\n"
    recipe.write_text(body + "rank: 1000\n")
    assert main(["validate", str(recipe)]) == 2
    assert "rank 1000 is more than the largest rank any adapted matrix has" in capsys.readouterr().err
    recipe.write_text(body + "rank: 2\n")
    assert main(["validate", str(recipe)]) == 0


def test_validate_says_a_shape_mismatch_once_per_model(tmp_path, capsys):
    """hp45 c51: validate listed one lm_head mismatch three times: for all models together, then for model 0 alone
    (the same problem, a shorter table), then model 1."""
    from safetensors.torch import load_file, save_file

    from tiesmerge.cli.main import main

    base, a, b = _family_dirs(tmp_path)
    weights = load_file(os.path.join(base, "model.safetensors"))
    weights["lm_head.weight"] = torch.cat([weights["lm_head.weight"], weights["lm_head.weight"][:1]])
    save_file(weights, os.path.join(base, "model.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {base}\nmodels: [{a}, {b}]\n")
    assert main(["validate", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert err.count("shapes differ between the base and model 0") == 1, err
    assert err.count("shapes differ between the base and model 1") == 1, err


# ------------------------------------------------------------------ pass 46 (the fixes of pass 45, from another side)
def test_a_plugin_returning_float8_is_a_method_error(tmp_path):
    """hp46 c03b: a plugin method returning float8_e4m3fn values raised torch's raw NotImplementedError ("isfinite"
    not implemented for 'Float8_e4m3fn') from pass 45's finite check."""
    from test_hostile_fortysecond_pass import _method_of
    from tiesmerge.errors import MethodError

    base, a, b = _family_dirs(tmp_path)
    with pytest.raises(MethodError, match=r"returned float8_e4m3fn values for tensor"):
        tiesmerge.merge(base, [a, b], _method_of(lambda tau: tau.sum(0).to(torch.float8_e4m3fn), "f8"))


def test_a_sentence_transformers_module_at_any_path_counts_among_the_files(tmp_path):
    """hp46 c02: a Pooling module at ``pooling/`` (a path modules.json may name) switched from mean to CLS pooling
    resumed a search silently: only N_Name folders were stamped."""
    from tiesmerge.tuning.driver import weights_stamp

    base, _, _ = _family_dirs(tmp_path)
    pooling = _with_st_modules(tmp_path / "base", "pooling", {"pooling_mode_mean_tokens": True})
    before = weights_stamp([base])
    (pooling / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert weights_stamp([base]) != before


def test_an_evaluator_in_a_module_named_like_tiesmerge_is_the_users(tmp_path, monkeypatch):
    """hp46 c03: a callable object ``E(sign)`` in a user module named ``tiesmerge_eval.py`` was skipped by the digest
    and the warning (its module "starts with tiesmerge"): a resume with another sign went on silently."""
    from tiesmerge.tuning.evaluator_digest import evaluator_objects

    (tmp_path / "tiesmerge_eval.py").write_text("class E:\n    def __init__(self, sign):\n        self.sign = sign\n"
                                                "    def __call__(self, state):\n        return self.sign\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import tiesmerge_eval

    assert evaluator_objects(tiesmerge_eval.E(1)) == ["E"]


def _data_variants():
    import collections

    import pandas as pd
    from torch.utils.data import BatchSampler, DataLoader, SubsetRandomSampler, TensorDataset

    class SignedDeque(collections.deque):
        pass

    def deque_with(sign):
        held = SignedDeque([1, 2])
        held.sign = sign
        return held

    def frame_with(sign):
        frame = pd.DataFrame({"y": [1.0, 2.0]})
        frame.attrs["sign"] = sign
        return frame

    def loader_over(n):
        data = TensorDataset(torch.arange(10.0))
        return DataLoader(data, batch_sampler=BatchSampler(SubsetRandomSampler(range(n)), 4, drop_last=False))

    return {"batch_sampler": (lambda: loader_over(5), lambda: loader_over(10)),
            "deque_subclass": (lambda: deque_with(1), lambda: deque_with(0)),
            "dataframe_attrs": (lambda: frame_with(1), lambda: frame_with(-1))}


@pytest.mark.parametrize("kind", ["batch_sampler", "deque_subclass", "dataframe_attrs"])
def test_data_containers_are_digested_with_their_settings(kind):
    """hp46 c04: a DataLoader with a batch_sampler over range(5) then range(10), a deque subclass's ``.sign``, a
    DataFrame's ``.attrs["sign"]``: one digest each, the second run reusing the first's scores."""
    _digested_apart(*_data_variants()[kind])


def test_a_sets_digest_does_not_depend_on_the_hash_seed(tmp_path):
    """hp46 c15: a frozenset of items alike to depth 2 (("sst2", (("negative", "bad"), ...)) and deeper) had a digest
    that changed with PYTHONHASHSEED: the sort keys stopped at depth 2, so such items tied and kept the set's order.
    An unchanged evaluator's resume was refused as "another search" every other run."""
    import subprocess
    import sys

    code = ("from tiesmerge.tuning.evaluator_digest import evaluator_state\n"
            "tags = frozenset({((((f't{i}',),),),) for i in range(6)})\n"
            "def score(state, tags=tags):\n    return 1.0\n"
            "print(evaluator_state(score))\n")
    children = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,  # side by side
                                 env={**os.environ, "PYTHONHASHSEED": str(seed),
                                      "PYTHONPATH": os.pathsep.join(sys.path)}) for seed in (1, 2, 3, 4)]
    seen = {child.communicate(timeout=120)[0].strip() for child in children}
    assert len(seen) == 1 and "" not in seen, seen


@pytest.mark.parametrize("change", ["umask", "chdir"])
def test_an_evaluator_module_that_changes_the_process_at_import_is_put_back(tmp_path, monkeypatch, capsys, change):
    """hp46 c07: an evaluator module calling os.umask(0o777) as it is imported made tune write its output and --json
    with mode 000, no word; c08: one calling os.chdir(elsewhere) at import made the inputs read there ("no such
    file", or other models of the same names) and the output written there. Both are put back after the import."""
    from tiesmerge.cli.main import main

    base, a, b = _family_dirs(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    body = "import os\nos.umask(0o777)\n" if change == "umask" else \
        f"import os\nos.chdir({str(tmp_path / 'elsewhere')!r})\n"
    name = f"meddling_{change}"
    (tmp_path / f"{name}.py").write_text(body + "def score(state):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    umask = os.umask(0o022)
    try:
        assert main(["tune", "--base", "base", "--model", "ft0", "--model", "ft1", "--evaluator", f"{name}:score",
                     "--grid", "density=0.2", "--grid", "lam=1.0", "-o", "out", "--json", "g.json"]) == 0
        err = capsys.readouterr().err
        assert f"--evaluator {name}:score's module changed the" in err and "after its import" in err
        assert os.getcwd() == str(tmp_path) and (tmp_path / "out").is_dir() and (tmp_path / "g.json").is_file()
        assert (tmp_path / "out").stat().st_mode & 0o700 == 0o700
        assert not any((tmp_path / "elsewhere").iterdir())
    finally:
        os.umask(umask)


def test_an_adapt_checkpoint_folder_replaced_by_a_link_is_not_written_through(tmp_path):
    """hp46 c06: the checkpoint's folder moved away and replaced by a link to model 1's folder while adapt ran: the
    checkpoint was written among model 1's files, and the error then blamed the user ("model 1 changed")."""
    from test_adapt_hostile import _encode, _net, _setup
    from tiesmerge.errors import OutputError
    from tiesmerge.evaluation.forward import FunctionLogits

    base, fts, files = _setup(tmp_path)
    base, *fts = [str(write_hf_dir(tmp_path / name, sd)) for name, sd in zip(("b", "m1", "m2"), (base, *fts))]
    (tmp_path / "ckdir").mkdir()
    calls = []

    def logits(module, batch, task):
        calls.append(1)
        if len(calls) == 3:
            os.rename(tmp_path / "ckdir", tmp_path / "ckdir.old")
            os.symlink(fts[0], tmp_path / "ckdir")
        return module(batch)

    before = sorted(os.listdir(fts[0]))
    with pytest.raises(OutputError, match=r"ckdir: the checkpoint's folder was replaced"):
        tiesmerge.adapt(base, fts, files, forward=FunctionLogits(_net(), logits, encode=_encode), steps=6,
                        checkpoint=tmp_path / "ckdir" / "ck.safetensors", checkpoint_every=1,
                        output=tmp_path / "out")
    assert sorted(os.listdir(fts[0])) == before


class _Metric:
    def __init__(self, sign):
        self.sign = sign

    def score(self, state):
        return float(self.sign)


@pytest.mark.parametrize("hold", [lambda m: [m.score], lambda m: {"acc": m.score},
                                  lambda m: (__import__("functools").partial(m.score),)],
                         ids=["list", "dict", "tuple_of_partial"])
def test_an_object_behind_metrics_kept_in_a_container_is_warned_as_one_held_directly(hold):
    """hp46 c19: metrics held as ``[Metric(sign).score]`` (a list, a dict, a tuple of partials) escaped the warning a
    bound method held directly gets, and the digest: a resume with sign -1 reused the +1 scores."""
    from tiesmerge.tuning.evaluator_digest import evaluator_objects

    def make(metrics):
        def score(state):
            return float(len(metrics))
        return score

    assert evaluator_objects(make(hold(_Metric(1)))) == ["_Metric"]


def test_a_partial_evaluators_code_is_its_functions_module(tmp_path, monkeypatch):
    """hp46 c20: ``score = functools.partial(_score, sign=1.0)`` in ev.py: the code digest read the partial's module
    (functools) and digested the standard library, so an edit of ev.py resumed the old scores."""
    from tiesmerge.tuning.driver import _evaluator_code

    (tmp_path / "partial_eval.py").write_text("import functools\ndef _score(state, sign):\n    return sign\n"
                                              "score = functools.partial(_score, sign=1.0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import partial_eval

    assert _evaluator_code(partial_eval.score)[0] == str(tmp_path / "partial_eval.py")


def test_llvmlite_failing_to_load_under_an_address_space_limit_is_said_to_be_the_limit(monkeypatch, capsys):
    """hp46 c17b: under ``ulimit -v 250000`` numba's llvmlite could not be mapped: "Could not find/load shared object
    file 'libllvmlite.so' ... / hint: fix the cause", the limit not named."""
    from tiesmerge import errors
    from tiesmerge.cli import commands
    from tiesmerge.cli.main import main

    def loads(args):
        raise OSError("Could not find/load shared object file 'libllvmlite.so' from the llvmlite package")

    monkeypatch.setattr(errors, "_address_space_limited", lambda: True)
    monkeypatch.setitem(commands.HANDLERS, "analyze", loads)
    assert main(["analyze", "--base", "b", "--model", "m", "-o", "o"]) == 1
    err = capsys.readouterr().err
    assert "ran out of memory while loading a library" in err and "raise the limit (ulimit -v" in err
    monkeypatch.setattr(errors, "_address_space_limited", lambda: False)  # no limit: the file's own problem
    assert main(["analyze", "--base", "b", "--model", "m", "-o", "o"]) == 1
    assert "loading a library" not in capsys.readouterr().err


@pytest.mark.parametrize("first, other", [
    (lambda: __import__("numpy").random.SeedSequence(0), lambda: __import__("numpy").random.SeedSequence(1)),
    (lambda: __import__("numpy").random.default_rng(0), lambda: __import__("numpy").random.default_rng(1)),
    (lambda: __import__("numpy").random.RandomState(0), lambda: __import__("numpy").random.RandomState(1)),
    (lambda: torch.Generator().manual_seed(0), lambda: torch.Generator().manual_seed(1)),
    (lambda: __import__("numpy").maximum, lambda: __import__("numpy").minimum),
    (lambda: __import__("operator").add, lambda: __import__("operator").sub),
    (lambda: __import__("operator").itemgetter(0), lambda: __import__("operator").itemgetter(1))],
    ids=["seed_sequence", "generator", "random_state", "torch_generator", "ufunc", "builtin", "itemgetter"])
def test_seeds_and_library_callables_in_a_closure_are_digested(first, other):
    """hp46 c35: a validation subsample's seed held as np.random.SeedSequence(s), default_rng(s), RandomState(s) or a
    seeded torch.Generator digested alike for seeds 0 and 1 (a resume over another subsample went on); c36: np.maximum
    and np.minimum, operator.add and operator.sub, itemgetter(0) and (1) held as the evaluator's aggregate likewise."""
    _digested_apart(first, other)


@pytest.mark.parametrize("where", ["sign_from", "mergekit_base"])
def test_a_link_loop_as_a_reference_or_a_mergekit_base_is_said_to_be_one(tmp_path, capsys, where):
    """hp46 c25b: a symbolic link loop given as --sign-from or as a mergekit base_model: "unexpected RuntimeError:
    Symlink loop from ... this is a bug in tiesmerge" (Path.resolve() comparing it with the base)."""
    from tiesmerge.cli.main import main

    base, a, b = _family_dirs(tmp_path)
    os.symlink(tmp_path / "loopb", tmp_path / "loopa")
    os.symlink(tmp_path / "loopa", tmp_path / "loopb")
    if where == "sign_from":
        argv = ["merge", "--base", base, "--model", a, "--model", b, "--sign-from", str(tmp_path / "loopa")]
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"merge_method: ties\nbase_model: {tmp_path / 'loopa'}\nmodels:\n"
                          f"  - {{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}\n")
        argv = ["merge", str(recipe)]
    assert main([*argv, "-o", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "symbolic link loop" in err and "bug" not in err


def test_a_users_evaluator_with_a_data_attribute_is_not_read_as_a_builtins_file(tmp_path):
    """hp46 c44: a user's callable object whose own ``data`` attribute named a FIFO (or /dev/zero) hung the search
    before its first candidate: its ``.data`` was opened and hashed as a built-in's data file. Only a regular file is
    (a changed one refuses the resume: hp11 F13), never a FIFO or a device."""
    from tiesmerge.tuning import run_search
    from tiesmerge.tuning.driver import _evaluator_data

    class Scorer:
        def __init__(self, data):
            self.data = data

        def __call__(self, state):
            return 1.0

    os.mkfifo(tmp_path / "fifo")
    scorer = Scorer(str(tmp_path / "fifo"))
    assert _evaluator_data(scorer) is None and _evaluator_data(Scorer("/dev/zero")) is None
    (tmp_path / "t.txt").write_text("one line\n")
    assert _evaluator_data(Scorer(str(tmp_path / "t.txt"))) == str(tmp_path / "t.txt")
    base, a, b = _family_dirs(tmp_path)
    result = run_search(base, [a, b], "ties", scorer, grid={"density": [0.2], "lam": [1.0]},
                        log=tmp_path / "log.jsonl")
    assert result.best.score == 1.0


@pytest.mark.parametrize("first, other", [
    (lambda: __import__("pandas").DataFrame({"choices": [["a", "b"], ["c", "d"]]}),
     lambda: __import__("pandas").DataFrame({"choices": [["a", "b"], ["c", "x"]]})),
    (lambda: __import__("pandas").Series([{"a": 1}, {"b": 2}]),
     lambda: __import__("pandas").Series([{"a": 1}, {"b": 3}])),
    (lambda: __import__("pandas").Categorical(["a", "b"]), lambda: __import__("pandas").Categorical(["a", "c"]))],
    ids=["list_column", "series_of_dicts", "categorical"])
def test_pandas_objects_pandas_cannot_hash_are_digested_by_their_values(first, other):
    """hp46 c50: a DataFrame with a list column (multiple-choice rows), a Series of dicts, a Categorical: pandas'
    hash refused them and they were digested by their class only, so other rows resumed silently."""
    _digested_apart(first, other)


def test_a_reference_models_change_is_named_once(tmp_path):
    """hp46 c24: "the the reference model (sign_from) model changed while the search ran"."""
    import shutil

    from tiesmerge.errors import CheckpointError
    from tiesmerge.tuning import run_search

    base, a, b = _family_dirs(tmp_path)
    shutil.copytree(a, tmp_path / "ref")
    calls = []

    def evaluate(state):
        calls.append(1)
        if len(calls) == 1:
            _replace_weights(tmp_path / "ref", tmp_path)
        return 1.0

    with pytest.raises(CheckpointError, match=r"ref: the reference model \(sign_from\) changed while the search ran"):
        run_search(base, [a, b], "ties", evaluate, grid={"density": [0.2, 0.5], "lam": [1.0]},
                   fixed={"sign_from": str(tmp_path / "ref")})


def test_a_mergekit_recipe_with_a_lora_entry_promotes_the_dtypes_too(lora_family, tmp_path, capsys):
    """hp46 c38b: a mergekit recipe without dtype over a bfloat16 base_model, a float16 (or float32) model and a
    BASE+LORA entry was written bfloat16, no warning (the adapter's dtype was unknown, so the promotion was skipped);
    mergekit writes float32."""
    from safetensors.torch import load_file, save_file

    from tiesmerge.cli.main import main

    base_sd, base, dirs, _ = lora_family
    save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in base_sd.items()},
              str(base / "model.safetensors"))
    full = write_hf_dir(tmp_path / "full", {k: (v + 0.01).half() if v.is_floating_point() else v
                                            for k, v in base_sd.items()})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                      f"  - {{model: {full}, parameters: {{weight: 1.0}}}}\n"
                      f"  - {{model: {base}+{dirs[0]}, parameters: {{weight: 1.0}}}}\n")
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "no dtype given: the output is float32, the models' dtypes promoted" in capsys.readouterr().err
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {v.dtype for k, v in written.items() if base_sd[k].is_floating_point()} == {torch.float32}


def test_choices_differing_only_in_spaces_are_said_so(tmp_path):
    """hp46 c41: the choices [" good", "good"] were refused as "the choice 'good' is listed twice"."""
    from test_hostile_fortieth_pass_evaluators import _llama
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import ChoiceAccuracy

    _llama(tmp_path / "lm")
    data = tmp_path / "ch.jsonl"
    data.write_text('{"prompt": "the cat", "choices": [" sat", "sat"], "label": 0}\n')
    with pytest.raises(ConfigError, match=r"the choice 'sat' is listed twice \(' sat' and 'sat' differ only in "
                                          r"spaces\)"):
        ChoiceAccuracy(tmp_path / "lm", data)


def test_an_evaluator_named_as_a_method_of_a_module_level_object_loads(tmp_path, monkeypatch):
    """hp46 c47: ``--evaluator ev:obj.score`` was refused with the hint to "define 'obj.score'", which no module can
    do: the dotted name is followed from the module."""
    from tiesmerge.cli.commands import _load_callable

    (tmp_path / "dotted_eval.py").write_text("class Scorer:\n    def score(self, state):\n        return 2.0\n"
                                             "obj = Scorer()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _load_callable("dotted_eval:obj.score")({}) == 2.0


def test_save_stats_with_its_arguments_swapped_is_said_so(tmp_path):
    """hp46 c29b: ``save_stats(stats, directory)`` raised a raw AttributeError ('str' has no attribute 'tensors')."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats import Statistics, StatsManifest, save_stats

    stats = Statistics(StatsManifest("fisher", 1), {"w": torch.ones(2)})
    with pytest.raises(ConfigError, match=r"stats must be a Statistics object, got str \(the arguments swapped"):
        save_stats(stats, str(tmp_path / "s"))


def test_an_output_that_is_a_link_loop_is_said_to_loop(tmp_path):
    """hp46 c25d: ``-o LOOP`` was "a link (to 'loopb') whose target does not exist": loopb exists, it loops."""
    from tiesmerge.errors import OutputError

    base, a, b = _family_dirs(tmp_path)
    os.symlink(tmp_path / "loopb", tmp_path / "loopa")
    os.symlink(tmp_path / "loopa", tmp_path / "loopb")
    with pytest.raises(OutputError, match=r"the output path is a link \(to '.*loopb'\) that loops back on itself"):
        tiesmerge.merge(base, [a, b], output=tmp_path / "loopa")


def test_force_over_an_output_whose_marker_was_edited_says_so(tmp_path):
    """hp46 c34b: --force over an output whose tiesmerge.json was edited: "this one holds other files (README.md,
    ..., tiesmerge.json)", naming the marker among the "other files"."""
    from tiesmerge.errors import OutputError

    base, a, b = _family_dirs(tmp_path)
    tiesmerge.merge(base, [a, b], output=tmp_path / "out")
    with open(tmp_path / "out" / "tiesmerge.json", "a") as f:
        f.write("x")
    with pytest.raises(OutputError, match=r"its tiesmerge\.json is not one tiesmerge wrote"):
        tiesmerge.merge(base, [a, b], output=tmp_path / "out", force=True)


def test_a_plugins_own_memory_error_names_the_method(tmp_path):
    """hp46 c03c: a plugin method raising MemoryError itself was "ran out of memory (MemoryError)", the method not
    named (its other exceptions are MethodErrors naming it)."""
    from test_hostile_fortysecond_pass import _method_of
    from tiesmerge.errors import OutOfMemoryError

    base, a, b = _family_dirs(tmp_path)

    def greedy(tau):
        raise MemoryError("wanted 1 TB")

    with pytest.raises(OutOfMemoryError, match=r"method 'greedy' \(.*Custom\) ran out of memory on tensor"):
        tiesmerge.merge(base, [a, b], _method_of(greedy, "greedy"))


def test_a_memory_error_inside_an_import_during_a_merge_names_the_limit(tmp_path, monkeypatch):
    """hp46 c17c: a MemoryError while a module was imported during the merge was hinted "give a smaller memory
    budget (e.g. 16MiB)", the example halving at each retry: no budget helps a library's import."""
    import sys

    from tiesmerge.engine import executor
    from tiesmerge.errors import OutOfMemoryError

    base, a, b = _family_dirs(tmp_path)

    def imports(self, sink):
        import _tm_heavy_library  # noqa: F401

    monkeypatch.setattr(sys, "meta_path", [_RefusingLoader(), *sys.meta_path])
    monkeypatch.setattr(executor.Executor, "_run_with_threads", imports)
    with pytest.raises(OutOfMemoryError, match="while loading a library") as caught:
        tiesmerge.merge(base, [a, b], output=tmp_path / "out")
    assert "raise the limit" in caught.value.hint and "budget" not in caught.value.hint
