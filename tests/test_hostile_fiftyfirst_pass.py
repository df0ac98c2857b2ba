"""Hostile pass 51b (tune side): evaluators the search log's digests told apart from nothing, and a resume checked by
one logged candidate only. Each resumed another evaluator's log silently."""

from __future__ import annotations

import functools
import importlib
import sys
import zipfile

import pytest
import torch

from helpers_ckpt import make_family, write_hf_dir


def _factory(op):
    def score(state):  # the evaluator a factory builds around a routine the user picks
        return float(op(state["w"]))
    return score


@pytest.mark.parametrize("pair", [
    (torch.Tensor.amax, torch.Tensor.amin),  # method descriptors (hp51 d02)
    (float.__neg__, float.__pos__),  # slot wrappers (d04)
    (str.upper, str.lower),
    ((2.0).__mul__, (3.0).__mul__),  # the same slot bound to other values
])
def test_c_methods_held_by_an_evaluator_are_told_apart(pair):
    """hp51 d02, d04: a factory's routine given as torch.Tensor.amax or .amin (a C type's method descriptor), or a
    default holding float.__neg__ or __pos__ (a slot wrapper), digested as nothing: a search resumed the other's log
    silently wherever the checked candidate scored alike."""
    from tiesmerge.tuning.evaluator_digest import evaluator_state

    first, second = (evaluator_state(_factory(op)) for op in pair)
    assert first is not None and second is not None and first != second
    assert evaluator_state(_factory(pair[0])) == first  # stable: a resume with the same one goes on


@pytest.mark.parametrize("wrap", [
    functools.lru_cache(maxsize=None),  # hp51 d03
    functools.cache,
    staticmethod,
    functools.cached_property,
])
def test_lambdas_inside_library_wrappers_are_told_apart_by_their_code(wrap):
    """hp51 d03, d01: `lru_cache(lambda t: 1.0)` and `lru_cache(lambda t: -1.0)` held by a factory digested alike: the
    wrapper's __wrapped__ was followed for its closure values, not its code; staticmethod and cached_property not at
    all."""
    from tiesmerge.tuning.evaluator_digest import evaluator_state

    first, second = (evaluator_state(_factory(wrap(fn))) for fn in (lambda t: 1.0, lambda t: -1.0))
    assert first is not None and first != second


def test_a_numba_compiled_lambda_is_told_apart_by_its_code():
    """hp51 d22: numba.njit over `lambda x: x + 1.0` and over `x - 1.0`, held by a factory, digested alike (numba
    keeps the lambda under __wrapped__)."""
    numba = pytest.importorskip("numba")
    from tiesmerge.tuning.evaluator_digest import evaluator_state

    first, second = (evaluator_state(_factory(numba.njit(fn))) for fn in (lambda x: x + 1.0, lambda x: x - 1.0))
    assert first != second


def test_models_held_by_an_evaluator_count_by_their_class():
    """hp51 d01: an evaluator built around torch.nn.ReLU() or torch.nn.Tanh() digested alike (a model's weights are
    the candidate's, its class is the user's choice)."""
    from tiesmerge.tuning.evaluator_digest import evaluator_state

    def make(head):
        def score(state):
            return float(head(state["w"]).sum())
        return score

    assert evaluator_state(make(torch.nn.ReLU())) != evaluator_state(make(torch.nn.Tanh()))


_EVALUATOR = "from {helper} import SIGN\n\n\ndef score(state):\n    return SIGN * float(state['w'].sum())\n"


def _import_fresh(monkeypatch, folder, name):
    monkeypatch.syspath_prepend(str(folder))
    for loaded in [m for m in sys.modules if m.split(".")[0] in (name.split(".")[0], "h", "common", "lib")]:
        monkeypatch.delitem(sys.modules, loaded)
    importlib.invalidate_caches()
    return importlib.import_module(name)


def _code_after_helper_change(monkeypatch, folder, module_name, helper_file):
    """The evaluator code digest before and after the helper's SIGN flips (each imported afresh)."""
    from tiesmerge.tuning.driver import _content_digest, _evaluator_code

    digests = []
    for sign in (1, -1):
        helper_file.write_text(f"SIGN = {sign}\n")
        module = _import_fresh(monkeypatch, folder, module_name)
        code = _evaluator_code(module.score)
        assert code is not None and str(helper_file.resolve()) in code
        digests.append(_content_digest(code))
    return digests


def test_helpers_beside_a_linked_evaluator_module_count(tmp_path, monkeypatch):
    """hp51 d10: A/ev.py a link to ../B/ev.py, its helper A/h.py beside the link: helpers were looked for beside the
    link's target, so a changed h.py resumed silently."""
    (tmp_path / "A").mkdir(), (tmp_path / "B").mkdir()
    (tmp_path / "B" / "ev.py").write_text(_EVALUATOR.format(helper="h"))
    (tmp_path / "A" / "ev.py").symlink_to(tmp_path / "B" / "ev.py")
    first, second = _code_after_helper_change(monkeypatch, tmp_path / "A", "ev", tmp_path / "A" / "h.py")
    assert first != second


def test_helpers_through_a_linked_subfolder_count(tmp_path, monkeypatch):
    """hp51 d21: proj/ev.py imports lib.hh, proj/lib a link to ../shared/lib: the helper's real path lies outside
    proj, so it did not count."""
    (tmp_path / "proj").mkdir(), (tmp_path / "shared" / "lib").mkdir(parents=True)
    (tmp_path / "proj" / "ev.py").write_text(_EVALUATOR.format(helper="lib.hh"))
    (tmp_path / "proj" / "lib").symlink_to(tmp_path / "shared" / "lib")
    first, second = _code_after_helper_change(monkeypatch, tmp_path / "proj", "ev",
                                              tmp_path / "shared" / "lib" / "hh.py")
    assert first != second


def test_helpers_beside_a_package_evaluator_count(tmp_path, monkeypatch):
    """hp51 d11: `--evaluator pkg:score` with score in pkg/__init__.py importing common.py from beside pkg/: the
    helper folder was pkg/ itself (pkg.ev:score was right)."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(_EVALUATOR.format(helper="common"))
    first, second = _code_after_helper_change(monkeypatch, tmp_path, "pkg", tmp_path / "common.py")
    assert first != second


def test_an_evaluator_imported_from_a_zip_counts_by_the_archive(tmp_path, monkeypatch):
    """hp51 d17: an evaluator module inside a zip on sys.path had no code digest at all: the zip rebuilt with another
    sign resumed silently."""
    from tiesmerge.tuning.driver import _content_digest, _evaluator_code

    archive = tmp_path / "ev.zip"
    digests = []
    for sign in (1, -1):
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("zev.py", f"SIGN = {sign}\n\n\ndef score(state):\n    return SIGN * float(state['w'].sum())\n")
        monkeypatch.syspath_prepend(str(archive))
        monkeypatch.delitem(sys.modules, "zev", raising=False)
        importlib.invalidate_caches()
        sys.path_importer_cache.pop(str(archive), None)
        module = importlib.import_module("zev")
        code = _evaluator_code(module.score)
        assert code == [str(archive)]
        digests.append(_content_digest(code))
    assert digests[0] != digests[1]


def _sign_above(threshold):
    limit = {"above": threshold}  # a dict a closure holds: a cache to the digest, so not compared

    def score(state):  # agrees with the first run's evaluator below the threshold only
        total = sum(float(t.double().sum()) for t in state.values())
        return total if total < limit["above"] else -total
    return score


def test_a_resume_checks_the_logged_best_too(tmp_path):
    """hp51 d02/d03: a digest escape went through wherever the first logged candidate, the only one scored again,
    scored alike: the best (whose score decides the result) is scored again too."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    grid, log = {"density": (0.2,), "lam": (0.5, 1.0, 2.0)}, tmp_path / "log.jsonl"
    first = run_search(base, models, "ties", _sign_above(float("inf")), grid=grid, log=str(log))
    assert first.best.index != 0 and first.best.score > first.trials[0].score
    logged = log.read_bytes()
    # another evaluator, built so the digests cannot tell: it agrees on the first candidate and flips the others
    between = (first.trials[0].score + first.best.score) / 2
    other = _sign_above(between)
    with pytest.raises(ConfigError, match=rf"candidate {first.best.index} .* now where the log records"):
        run_search(base, models, "ties", other, grid=grid, log=str(log))
    assert log.read_bytes() == logged
    again = run_search(base, models, "ties", _sign_above(float("inf")), grid=grid, log=str(log))
    assert again.log_checked == 2 and again.evaluations == 2 and again.best.index == first.best.index


def _edited_log(tmp_path, edit):
    """A finished search's log, edited by ``edit(records)`` (a list of dicts, header left out)."""
    import json

    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    grid, log = {"density": (0.2, 0.5), "lam": (1.0,)}, tmp_path / "log.jsonl"
    run_search(base, models, "ties", _sign_above(float("inf")), grid=grid, log=str(log))
    header, *lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    edit(records)
    log.write_text("\n".join([header, *(json.dumps(r, sort_keys=True) for r in records)]) + "\n")
    return base, models, grid, log


def _swap_keys(records):
    records[0]["key"], records[1]["key"] = records[1]["key"], records[0]["key"]


def _second_key_twice(records):
    records[1]["key"], records[1]["options"] = records[0]["key"], records[0]["options"]


def _spaced_key(records):
    records[0]["key"] = records[0]["key"].replace(", ", ",")


@pytest.mark.parametrize("edit, said", [
    (_swap_keys, "its key .* and its options .* disagree"),  # hp51 d08a: blamed the evaluator
    (_second_key_twice, "is logged twice, with scores"),  # d08b
    (_spaced_key, "is not a candidate's options as the search writes them"),  # d08d
])
def test_a_hand_edited_search_log_is_refused_as_corrupt_naming_its_line(tmp_path, edit, said):
    """hp51 d08: records with swapped keys, one key twice with two scores, or a key respaced were refused as "what the
    evaluator scores changed" (or accepted): the log is corrupt, said with its line."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, models, grid, log = _edited_log(tmp_path, edit)
    before = log.read_bytes()
    with pytest.raises(ConfigError, match=rf"log.jsonl:[23]: the search log is corrupt \(.*{said}"):
        run_search(base, models, "ties", _sign_above(float("inf")), grid=grid, log=str(log))
    assert log.read_bytes() == before


def test_logged_options_the_method_refuses_name_the_log(tmp_path):
    """hp51 d08c, d16: a record edited to hold `seed` or density 5 said "candidate 0: ties: unknown option 'seed'",
    as if the user had given it."""
    import json

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    def extra_option(records):
        options = {**records[0]["options"], "seed": 0}
        records[0]["options"], records[0]["key"] = options, json.dumps(options, sort_keys=True)

    base, models, grid, log = _edited_log(tmp_path, extra_option)
    with pytest.raises(ConfigError, match=r"log.jsonl: the search log's records hold options this search's method "
                                          r"refuses \(.*seed") as caught:
        run_search(base, models, "ties", _sign_above(float("inf")), grid=grid, log=str(log))
    assert "delete those lines" in caught.value.hint


def test_a_patterns_match_budget_is_each_threads_own():
    """hp50 c06: two merges in two threads with one slow `exclude` shared one budget (the compiled pattern is cached
    per process): each was refused after half its time. A budget is per thread, and the clock still pickles."""
    import pickle
    import threading

    from tiesmerge.io.patterns import TOTAL_SECONDS, MatchClock

    clock = MatchClock("exclude", "hint")
    clock.charge(TOTAL_SECONDS * 0.6)
    other: list[float] = []
    worker = threading.Thread(target=lambda: (clock.charge(TOTAL_SECONDS * 0.6), other.append(clock.spent)))
    worker.start(), worker.join()
    assert other == [pytest.approx(TOTAL_SECONDS * 0.6)]  # not refused: its own 0.6, not 1.2
    assert clock.spent == pytest.approx(TOTAL_SECONDS * 0.6)
    copy = pickle.loads(pickle.dumps(clock))
    assert copy.what == "exclude" and copy.spent == 0.0


def test_a_folded_products_rows_formed_per_chunk_equal_the_whole_products(tmp_path, monkeypatch):
    """hp52 c01: past the bound on kept products (many MODEL+LORA entries, or another merge in the process) each
    chunk formed its own rows of B·A; a matmul of a few rows takes another kernel, which rounds otherwise: at a small
    budget 136 values were a bfloat16 ulp off mergekit's (whose whole product the larger budgets matched)."""
    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from tiesmerge.io import adapters
    from tiesmerge.methods import TaskArithmetic

    shapes = {"model.layers.0.self_attn.q_proj.weight": (512, 256), "model.layers.0.mlp.up_proj.weight": (384, 256),
              "model.norm.weight": (256,)}
    base, _ = make_family(1, dtype=torch.bfloat16, shapes=shapes, with_int=False)
    write_hf_dir(tmp_path / "base", base)
    write_lora_dir(tmp_path / "lora", random_lora(base, 16, seed=3, modules=["model.layers.0.self_attn.q_proj",
                                                                             "model.layers.0.mlp.up_proj"]), alpha=32.0)

    def merged(budget):
        return tiesmerge.merge(tmp_path / "base", [tmp_path / "lora"], TaskArithmetic(lam=1.0), dtype="float32",
                               origin={"format": "mergekit"}, memory_budget=budget)

    whole = merged("1GiB")
    monkeypatch.setattr(adapters, "_WHOLE_PRODUCT_BYTES", 0)  # no product kept: each chunk forms its own rows
    for budget in ("8KiB", "64KiB", "1MiB"):
        chunked = merged(budget)
        assert all(torch.equal(whole[n], chunked[n]) for n in whole), budget
    # hp53 c20: the plain adapter merge (s·B·A, no fold) formed a chunk's rows alone too: its bytes followed the budget
    plain = [tiesmerge.merge(tmp_path / "base", [tmp_path / "lora"], TaskArithmetic(lam=1.0), dtype="float32",
                             memory_budget=budget) for budget in ("1GiB", "8KiB", "64KiB")]
    assert all(torch.equal(plain[0][n], other[n]) for other in plain[1:] for n in plain[0])


@pytest.mark.parametrize("b_rank, said", [(3, "one rank r: A's is 2, B's 3"), (0, "the rank r is at least 1")])
def test_lora_factors_of_two_ranks_are_said_so(tmp_path, b_rank, said):
    """hp52 c25: lora_A of rank 8 and lora_B of rank 9 were refused with "a rank r of at least 1" and a hint that PEFT
    saves each factor 2-D, while both were 2-D and of rank 1 or more."""
    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from tiesmerge.errors import IncompatibleCheckpointsError

    base, _ = make_family(1)
    write_hf_dir(tmp_path / "base", base)
    factors = random_lora(base, 2, seed=0)
    module = next(iter(factors))
    a, b = factors[module]
    factors[module] = (a, torch.zeros(b.shape[0], b_rank))
    write_lora_dir(tmp_path / "lora", factors, alpha=4.0)
    with pytest.raises(IncompatibleCheckpointsError, match=said) as caught:
        tiesmerge.merge(tmp_path / "base", [tmp_path / "lora"], "task_arithmetic", lam=1.0)
    assert "each factor 2-D" not in str(caught.value) + str(caught.value.hint)


def test_an_adapter_bound_by_its_names_ending_under_a_mergekit_recipe_is_warned(tmp_path):
    """hp52 c32: an adapter saved from the bare model (`base_model.model.layers...`) on a base storing `model.layers...`
    merged silently under a mergekit recipe, bound by its names' ending; PEFT, which mergekit's model+lora loads
    through, loads none of those keys, so mergekit's output differs. Said; a plain merge binds it as before, unsaid."""
    import warnings

    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from tiesmerge.errors import MergeWarning
    from tiesmerge.methods import TaskArithmetic

    base, _ = make_family(1)
    write_hf_dir(tmp_path / "base", base)
    factors = random_lora(base, 2, seed=0)
    write_lora_dir(tmp_path / "lora", {m.removeprefix("model."): f for m, f in factors.items()}, alpha=4.0)
    write_lora_dir(tmp_path / "exact", factors, alpha=4.0)
    said = {}
    for name, origin in (("lora", {"format": "mergekit"}), ("lora", None), ("exact", {"format": "mergekit"})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tiesmerge.merge(tmp_path / "base", [tmp_path / name], TaskArithmetic(lam=1.0), origin=origin)
        said[name, bool(origin)] = [str(w.message) for w in caught if issubclass(w.category, MergeWarning)
                                    and "binds exact names only" in str(w.message)]
    assert len(said["lora", True]) == 1 and "4 adapted module name(s) such as 'layers." in said["lora", True][0]
    assert said["lora", False] == [] and said["exact", True] == []


def _base_ft_and_lora(tmp_path):
    """A base, a fine-tune and a LoRA of it in tmp_path/base, ft, lora."""
    from helpers_adapters import random_lora, write_lora_dir

    base, fts = make_family(1)
    write_hf_dir(tmp_path / "base", base)
    write_hf_dir(tmp_path / "ft", fts[0])
    write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=0), alpha=4.0)


def test_a_bare_adapter_as_a_mergekit_model_is_warned(tmp_path):
    """hp52 c35: `model: ADAPTER` in a mergekit recipe merged silently as BASE+ADAPTER, while mergekit itself stops on
    it ("Unrecognized model"), and the model card repeated a recipe mergekit cannot run."""
    from tiesmerge.errors import MergeWarning
    from tiesmerge.recipe import load_recipe

    _base_ft_and_lora(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                      f"  - {{model: {tmp_path / 'lora'}, parameters: {{weight: 1.0}}}}\n"
                      f"  - {{model: {tmp_path / 'ft'}, parameters: {{weight: 1.0}}}}\n"
                      f"  - {{model: {tmp_path / 'base'}+{tmp_path / 'lora'}, parameters: {{weight: 1.0}}}}\n"
                      "dtype: float32\n")
    with pytest.warns(MergeWarning, match=r"models\[0\].model: '.*lora' is a PEFT adapter on its own, which mergekit "
                                          r"refuses .* BASE\+ADAPTER \(.*base\+.*lora\)") as caught:
        load_recipe(recipe)
    assert sum("on its own" in str(w.message) for w in caught) == 1  # the full model and BASE+ADAPTER: no word


def _holding(value):
    def score(state):  # a factory's evaluator over a setting the user built
        return float(bool(value))
    return score


def test_a_simple_namespace_an_evaluator_holds_is_warned_not_digested():
    """hp52 c36: an evaluator's closure holding types.SimpleNamespace(b=B) (or a list of them) went unsaid: a resume
    with other settings mixed two evaluators' scores. Digesting its attributes (the first fix) refused a notebook's
    own resume where the namespace holds a cache or a counter the evaluator updates (hp53 c11): it is named in the
    resume warning, as an argparse.Namespace is."""
    import types

    from tiesmerge.tuning.evaluator_digest import evaluator_objects, evaluator_state

    for wrap in (lambda ns: ns, lambda ns: [ns]):
        held = types.SimpleNamespace(b=0.0, calls=0)
        evaluator = _holding(wrap(held))
        before = evaluator_state(evaluator)
        held.calls += 1  # what the evaluator counts while it scores
        assert evaluator_state(evaluator) == before
        assert evaluator_objects(evaluator) == ["SimpleNamespace"]


@pytest.mark.parametrize("held", [{"b": 1.0}, __import__("collections").Counter(b=1),
                                  __import__("collections").ChainMap({"b": 1.0}), {1, 2}])
def test_a_dict_or_set_a_closure_holds_is_said_not_compared(held):
    """hp52 c37: a dict, Counter, ChainMap or set held by the closure is left out of the digest (it is often a cache
    the evaluator fills) with no word, while the same dict in a tuple was digested: it is named among the objects a
    resume warns of."""
    from tiesmerge.tuning.evaluator_digest import evaluator_objects

    assert evaluator_objects(_holding(held)) == [type(held).__qualname__]


def test_data_keys_no_evaluator_reads_are_named(tmp_path):
    """hp52 c41: a sentence pair under `text_b` (or `textpair`) was silently ignored by classifier-accuracy, adapt and
    stats (scored on `text` alone); choice-accuracy ignored `answer` and `choice`. The unread keys are named, with
    the key meant."""
    import json

    from tiesmerge.errors import MergeWarning
    from tiesmerge.limits import warn_unread_keys
    from tiesmerge.stats.hf import read_jsonl

    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"a {i}", "text_b": f"b {i}", "label": i % 2, "idx": i})
                              for i in range(3)) + "\n")
    with pytest.warns(MergeWarning, match=r"pairs.jsonl: tiesmerge stats reads 'text', 'text_pair', 'label', 'choices' "
                                          r"from each line, and nothing from 'text_b' \(line 1; did you mean "
                                          r"'text_pair'\?\), 'idx' \(line 1\)"):
        read_jsonl(data)
    rows = [(1, {"prompt": "p", "choices": ["a", "b"], "answer": 1}), (2, {"prompt": "p", "choice": ["a"]})]
    with pytest.warns(MergeWarning, match=r"'answer' \(line 1; did you mean 'label'\?\), 'choice' \(line 2; did you "
                                          r"mean 'choices'\?\)"):
        warn_unread_keys(rows, "c.jsonl", ("prompt", "choices", "label"), "choice-accuracy")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unread_keys([(1, {"text": "t", "label": 0})], "ok.jsonl", ("text", "text_pair", "label"), "x")
    many = [(n, {"text": "t", f"note_{n}": 1}) for n in range(1, 201)]  # hp53 c39: 192 more were said 43 more
    with pytest.warns(MergeWarning, match=r"and 192 more key\(s\)"):
        warn_unread_keys(many, "m.jsonl", ("text", "label"), "x")


def test_a_resume_with_a_smaller_budget_says_a_better_logged_candidate_is_left_out(tmp_path):
    """hp52 c09: a search resumed with a smaller --budget than its log's took the best of its first candidates and
    wrote it, while a better one stayed in the log, unsaid."""
    from tiesmerge.errors import MergeWarning
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    log = tmp_path / "log.jsonl"
    score = _sign_above(float("inf"))
    full = run_search(base, models, "ties", score, strategy="random", budget=6, axes=("lam",), seed=0, log=str(log))
    assert full.best.index >= 2  # the best lies past the first two (else the case shows nothing)
    with pytest.warns(MergeWarning, match=rf"holds 4 scored candidate\(s\) this search did not ask for .* candidate "
                                          rf"{full.best.index} \(.*\) scored"):
        short = run_search(base, models, "ties", score, strategy="random", budget=2, axes=("lam",), seed=0,
                           log=str(log))
    assert short.best.score < full.best.score


def test_a_mixed_dtype_base_is_folded_in_the_dtype_transformers_loads_it_in(tmp_path):
    """hp49 c56: mergekit loads a MODEL+LORA entry's base with no dtype asked, and transformers (no dtype in
    config.json) loads every tensor in the first floating dtype of its first weights file; tiesmerge folded each
    tensor in its own stored dtype (q_proj stored float32 among bfloat16 weights: 9.6e-4 off mergekit)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import json

    from safetensors.torch import load_file, save_file

    from helpers_adapters import merged_as_model_plus_lora

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=40, tie_word_embeddings=False))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    weights = load_file(tmp_path / "base" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    weights[q] = weights[q].float() + 1e-3 * torch.randn(weights[q].shape)  # float32 values bfloat16 cannot hold
    save_file(weights, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config.pop("torch_dtype", None), config.pop("dtype", None)
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    adapter = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                  peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_" in name:
                p.data = p.float() + 0.3 * torch.randn(p.shape)
    adapter.save_pretrained(tmp_path / "lora")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=None)  # as mergekit does
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    reference = peft.PeftModel.from_pretrained(loaded, tmp_path / "lora").merge_and_unload().state_dict()
    ours = merged_as_model_plus_lora(tmp_path)
    for name in (q, "model.layers.0.self_attn.v_proj.weight"):
        stored = weights[name].float()  # mergekit's task arithmetic at weight 1: base + (folded - base), in float32
        assert torch.equal(ours[name], stored + (reference[name].float() - stored)), name


@pytest.mark.parametrize("origin", [None, {"format": "mergekit"}])
def test_a_saved_copy_past_float32_is_said_so_in_either_merge(tmp_path, origin):
    """hp51 c07: an adapter's modules_to_save copy saved in float64 holding 1e39 was refused under a mergekit recipe
    with remedies that cannot work (a float32 base, a plain merge), and the plain merge then called it damaged."""
    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from tiesmerge.errors import InvalidTensorError
    from tiesmerge.methods import TaskArithmetic

    base, _ = make_family(1, dtype=torch.bfloat16)
    write_hf_dir(tmp_path / "base", base)
    copy = base["model.norm.weight"].double()
    copy[3] = 1e39
    write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=0), alpha=4.0,
                   extra={"base_model.model.model.norm.modules_to_save.default.weight": copy},
                   config={"modules_to_save": ["norm"]})
    with pytest.raises(InvalidTensorError, match=r"norm.* holds float64 values beyond float32's range .* 1e\+39") \
            as caught:
        tiesmerge.merge(tmp_path / "base", [tmp_path / "lora"], TaskArithmetic(lam=1.0), dtype="float32",
                        origin=origin)
    assert "damaged" not in str(caught.value) + str(caught.value.hint) and "float32 (its" not in caught.value.hint


def test_python_m_in_a_deleted_working_folder_is_a_typed_error(tmp_path):
    """hp53 c27: `python -m tiesmerge` run from a working folder deleted meanwhile died with a traceback in its
    import-path cleaning, before the command could say what was wrong."""
    import os
    import subprocess
    import sys

    gone = tmp_path / "gone"
    gone.mkdir()
    done = subprocess.run(["sh", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "$0" -m tiesmerge merge --base '
                                       f'"{tmp_path}/b" --model "{tmp_path}/m" -o "{tmp_path}/o"', sys.executable],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 2 and "the working directory no longer exists" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("seconds", ['"abc"', None, "-1", "1e999"])
def test_a_log_record_whose_seconds_are_no_time_is_corrupt(tmp_path, seconds):
    """hp53 c05: a record edited to `"seconds": "abc"` (or without seconds) was "an unexpected ValueError ... a bug
    in tiesmerge" on resume: the log is corrupt, said with its line."""
    import json

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    def edit(records):
        if seconds is None:
            del records[1]["seconds"]
        else:
            records[1]["seconds"] = json.loads(seconds) if seconds != "1e999" else float("inf")

    base, models, grid, log = _edited_log(tmp_path, edit)
    with pytest.raises(ConfigError, match=r"log.jsonl:3: the search log is corrupt \(its seconds are .*, not a time"):
        run_search(base, models, "ties", _sign_above(float("inf")), grid=grid, log=str(log))


def test_a_folder_holding_a_full_model_and_an_adapter_is_refused(tmp_path, capsys):
    """hp53 c25: a folder with a fine-tuned model's model.safetensors and a PEFT adapter merged its adapter, silently,
    where mergekit (and transformers) read its full model: 9.3M values apart. Which is meant cannot be told."""
    from helpers_adapters import random_lora, write_lora_dir
    from tiesmerge.cli.main import main

    base, fts = make_family(1)
    write_hf_dir(tmp_path / "base", base)
    write_lora_dir(write_hf_dir(tmp_path / "both", fts[0]), random_lora(base, 2, seed=0), alpha=4.0)
    assert main(["merge", "--base", str(tmp_path / "base"), "--model", str(tmp_path / "both"), "-o",
                 str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "holds both a full model (model.safetensors) and a PEFT adapter (adapter_config.json)" in err
    assert "a folder of their own" in err and not (tmp_path / "out").exists()


def test_an_adapter_naming_a_prefix_the_bases_file_lacks_is_not_warned(tmp_path):
    """hp53 c02: a base saved without `model.` (as LlamaModel saves; transformers adds it when it loads the model as
    LlamaForCausalLM) and an adapter keyed `model.layers...` were warned as unloadable by PEFT, which loads them."""
    import warnings

    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from tiesmerge.methods import TaskArithmetic

    base, _ = make_family(1, with_int=False)
    write_hf_dir(tmp_path / "base", {k.removeprefix("model."): v for k, v in base.items()})
    write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=0), alpha=4.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiesmerge.merge(tmp_path / "base", [tmp_path / "lora"], TaskArithmetic(lam=1.0), origin={"format": "mergekit"})
    assert not [w for w in caught if "binds exact names only" in str(w.message)]


def test_lm_perplexity_on_json_lines_says_so(tmp_path):
    """hp53 c08: lm-perplexity given another evaluator's JSON-lines file scored the braces and keys as text, silently
    with a byte-level tokenizer."""
    from tiesmerge.errors import MergeWarning
    from tiesmerge.evaluation.builtin import LMPerplexity

    data = tmp_path / "val.jsonl"
    data.write_text('{"text": "a review", "label": 1}\n{"text": "another", "label": 0}\n')
    scorer = LMPerplexity.__new__(LMPerplexity)
    scorer.data, scorer.text = data, data.read_text()
    with pytest.warns(MergeWarning, match=r"its lines are JSON objects \(keys 'text', 'label'\), which lm-perplexity "
                                          r"scores as plain text"):
        scorer._warn_json_lines()
    scorer.text = "plain prose { not json }\nmore prose\n"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer._warn_json_lines()


def test_an_encoder_accuracy_classes_line_holding_an_example_is_refused(tmp_path):
    """hp53 c19: a 'classes' line that also held a text and a label dropped that example silently (or, the task's only
    example, said it had none)."""
    import json

    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import EncoderAccuracy

    data = tmp_path / "e.jsonl"
    data.write_text(json.dumps({"task": "t", "classes": ["bad", "good"], "text": "fine", "label": 1}) + "\n"
                    + json.dumps({"task": "t", "text": "awful", "label": 0}) + "\n")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(ConfigError, match=r"e.jsonl:1: a line holds either 'classes' .* or 'text' and 'label', not "
                                          r"both"):
        EncoderAccuracy(tmp_path / "m", data)


@pytest.mark.parametrize("name", ["results.md", "report.html"])
def test_json_output_onto_a_search_report_names_it(tmp_path, name):
    """hp53 c14: `tune --json DIR/results.md` of a search's folder was refused as "a file tiesmerge did not write"."""
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file
    from tiesmerge.tuning import run_search
    from tiesmerge.tuning.report import write_report

    base, models = make_family(2)
    result = run_search(base, models, "ties", _sign_above(float("inf")), grid={"density": (0.2,), "lam": (1.0,)},
                        log=str(tmp_path / "log.jsonl"))
    write_report(result, tmp_path)
    with pytest.raises(OutputError, match="would replace a file tiesmerge wrote as a search's report, not as --json"):
        check_output_file(tmp_path / name, True, [], "--json")


def test_a_bare_adapter_with_a_config_beside_it_is_warned_too(tmp_path):
    """hp53 c42: a bare adapter folder holding the base's config.json (as some trainers save it) got no word, while
    mergekit refuses it ("Unable to find model files"); c05: without a base_model, the warning spoke of a base."""
    from helpers_adapters import random_lora, write_lora_dir
    from tiesmerge.errors import ConfigError, MergeWarning
    from tiesmerge.recipe import load_recipe

    base, _ = make_family(1)
    write_hf_dir(tmp_path / "base", base)
    write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=0), alpha=4.0)
    (tmp_path / "lora" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                      f"  - {{model: {tmp_path / 'lora'}, parameters: {{weight: 1.0}}}}\ndtype: float32\n")
    with pytest.warns(MergeWarning, match="is a PEFT adapter on its own, which mergekit refuses as a model"):
        load_recipe(recipe)
    recipe.write_text(f"merge_method: linear\nmodels:\n  - {{model: {tmp_path / 'lora'}, parameters: {{weight: 1.0}}}}"
                      f"\n  - {{model: {tmp_path / 'base'}, parameters: {{weight: 1.0}}}}\ndtype: float32\n")
    import warnings
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ConfigError, match="is a PEFT adapter;"):
        warnings.simplefilter("always")
        load_recipe(recipe)
    assert not [w for w in caught if "on its own" in str(w.message)]


def test_models_apart_by_their_heads_prefix_are_said_so(tmp_path, capsys):
    """hp53 c44: a fine-tune saved as the bare body (no `model.`) beside its base was refused with "all models must be
    fine-tunes of the same base architecture", which they are: every name differs by the prefix only."""
    from tiesmerge.cli.main import main

    base, fts = make_family(1, with_int=False)
    write_hf_dir(tmp_path / "base", base)
    write_hf_dir(tmp_path / "bare", {k.removeprefix("model."): v for k, v in fts[0].items()})
    assert main(["merge", "--base", str(tmp_path / "base"), "--model", str(tmp_path / "bare"), "-o",
                 str(tmp_path / "out"), "--no-progress"]) == 1
    assert "every name differs only by the prefix 'model.'" in capsys.readouterr().err


@pytest.mark.parametrize("kind, row, unread", [("encoder", {"text": "a", "text_pair": "b"}, "text_pair"),
                                               ("choice", {"text": "a", "text_pair": "b", "choices": ["x", "y"]},
                                                "text_pair"),
                                               ("classifier", {"text": "a", "choices": ["x", "y"]}, "choices")])
def test_adapt_names_row_keys_its_forward_reads_nothing_from(kind, row, unread):
    """hp53 c24: adapt --forward encoder (or choice) learned on `text` alone from rows with a `text_pair`, and the
    classifier forward dropped `choices`, silently: the data reader knows every forward's keys."""
    from tiesmerge.adamerging.run import _warn_unread_by_forward
    from tiesmerge.errors import MergeWarning

    with pytest.warns(MergeWarning, match=rf"--forward {kind} reads .* and nothing from '{unread}' \(task 't' first\)"):
        _warn_unread_by_forward(kind, {"t": [row]})


def test_a_stop_between_the_temporary_output_and_its_cleanup_leaves_nothing(tmp_path, monkeypatch):
    """hp53 c40: a SIGTERM landing after the output's temporary folder was made and before the block that removes it
    (the free-space check) left `.tiesmerge-tmp-*` behind, while the message said nothing was left."""
    from tiesmerge.io import writer

    def stopped(path):
        raise KeyboardInterrupt  # as the stop signal's handler raises it there

    monkeypatch.setattr(writer.shutil, "disk_usage", stopped)
    with pytest.raises(KeyboardInterrupt), writer.atomic_directory(tmp_path / "made" / "out"):
        pass
    assert list(tmp_path.iterdir()) == []  # neither the temporary nor the parent folder it made


def test_adapt_with_a_forward_of_the_users_own_names_no_row_key_as_unread(tmp_path):
    """A forward of the user's own may read any key of a row (the data reader's list is the built-in forwards'): the
    unread-key warning (hp52 c41) is adapt's per built-in forward only."""
    import warnings

    from tiesmerge.adamerging.run import read_task_data

    data = tmp_path / "task0.jsonl"
    data.write_text('{"text": "a", "x": 1}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_task_data([data])["task0"] == [{"text": "a", "x": 1}]


def test_an_adapters_weights_file_given_as_a_model_names_its_folder(tmp_path, capsys):
    """hp54 c12: `--model ADAPTER/adapter_model.safetensors` was read as a full model: "tensor names differ", hinted as
    another architecture; c02: a folder of a model and an adapter given as --base was said to be "the model"."""
    from helpers_adapters import random_lora, write_lora_dir
    from tiesmerge.cli.main import main

    base, fts = make_family(1)
    write_hf_dir(tmp_path / "base", base)
    write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=0), alpha=4.0)
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    assert main(["merge", "--base", str(tmp_path / "base"), "--model", str(weights), "-o", str(tmp_path / "out"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "is a PEFT adapter's weights file" in err and f"give its folder as a model: {tmp_path / 'lora'}" in err
    write_lora_dir(write_hf_dir(tmp_path / "both", fts[0]), random_lora(base, 2, seed=0), alpha=4.0)
    assert main(["merge", "--base", str(tmp_path / "both"), "--model", str(tmp_path / "lora"), "-o",
                 str(tmp_path / "out"), "--no-progress"]) == 1
    assert "which of them is meant cannot be told" in capsys.readouterr().err


def test_json_nested_past_pythons_limit_is_a_typed_error_everywhere_it_is_read(tmp_path):
    """hp54 c01, c09, c10, c11: a search log's header or a record's key nested 100,000 deep, an adapt checkpoint's
    fingerprint, and a text file opening with 3,000 '[' for lm-perplexity were "an unexpected RecursionError ... a
    bug in tiesmerge"."""
    import json

    from tiesmerge.adamerging.learn import _differing_parts
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import LMPerplexity
    from tiesmerge.tuning.results_log import FORMAT, ResultsLog

    deep = "[" * 100000 + "]" * 100000
    log = tmp_path / "log.jsonl"
    log.write_text(f'{{"format": "{FORMAT}", "x": {deep}}}\n')
    with pytest.raises(ConfigError, match=r"log.jsonl:1: the search log is corrupt \(its header is damaged"):
        ResultsLog(log, {"method": "ties"})
    good = ResultsLog(tmp_path / "good.jsonl", {"method": "ties"})
    good.append({"key": "{}", "options": {}, "score": 1.0, "seconds": 1.0})
    good.close()
    header = (tmp_path / "good.jsonl").read_text().splitlines()[0]
    log.write_text(header + "\n" + json.dumps({"key": deep, "options": {}, "score": 1.0, "seconds": 1.0}) + "\n")
    with pytest.raises(ConfigError, match=r"log.jsonl:2: the search log is corrupt \(its key .* is not a candidate"):
        ResultsLog(log, {"method": "ties"})
    assert _differing_parts(deep, "{}") == []
    scorer = LMPerplexity.__new__(LMPerplexity)
    scorer.data, scorer.text = tmp_path / "t.txt", "[" * 3000 + "\nplain text\n"
    scorer._warn_json_lines()  # text that merely opens with brackets: scored as text, no word


def test_a_merged_adapter_is_checked_for_its_own_size_and_its_write_errors_are_typed(tmp_path, monkeypatch):
    """hp54 c25: a merged adapter's free-space check asked for the full model's size (a 1 MiB adapter refused for
    5.6 MiB); c24: past a file-size limit its weights file was "an unexpected SafetensorError ... a bug"."""
    import collections

    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from tiesmerge.errors import OutputError
    from tiesmerge.io import adapter_writer, writer

    shapes = {"model.layers.0.self_attn.q_proj.weight": (256, 256), "model.layers.0.mlp.up_proj.weight": (512, 256),
              "model.norm.weight": (256,)}
    base, _ = make_family(1, shapes=shapes, with_int=False)
    write_hf_dir(tmp_path / "base", base)
    loras = [write_lora_dir(tmp_path / f"lora{k}", random_lora(base, 2, seed=k, modules=[
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]), alpha=4.0) for k in range(2)]
    adapter = tiesmerge.plan_merge(tmp_path / "base", loras, "task_arithmetic", output_format="adapter")
    full = tiesmerge.plan_merge(tmp_path / "base", loras, "task_arithmetic")
    assert adapter.output_bytes * 10 < full.output_bytes
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: usage(1 << 40, 0, adapter.output_bytes + (64 << 10)))
    tiesmerge.merge(tmp_path / "base", loras, "task_arithmetic", output_format="adapter", output=tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()

    def full_disk(tensors, path, metadata=None):
        raise Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                        'left on device" }) (os error 28)')  # as safetensors words it

    monkeypatch.setattr(adapter_writer, "save_file", full_disk)
    with pytest.raises(OutputError, match=r"b/adapter_model.safetensors: cannot write it: .*No space left"):
        tiesmerge.merge(tmp_path / "base", loras, "task_arithmetic", output_format="adapter", output=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_recipe_hints_speak_in_recipe_terms(tmp_path, capsys):
    """hp54 c46: an adapter as a mergekit recipe's base_model was hinted "--base takes the full model ... pass adapters
    with --model", flags refused over a recipe; c56: --vocab-policy over a mergekit recipe did not name
    tokenizer_source, the recipe's way to say it."""
    from tiesmerge.cli.main import main

    _base_ft_and_lora(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                      f"  - {{model: {tmp_path / 'ft'}, parameters: {{weight: 1.0}}}}\ndtype: float32\n")
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--vocab-policy", "truncate"]) == 2
    assert "--vocab-policy is tokenizer_source: base or union" in capsys.readouterr().err
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'lora'}\nmodels:\n"
                      f"  - {{model: {tmp_path / 'ft'}, parameters: {{weight: 1.0}}}}\ndtype: float32\n")
    main(["merge", str(recipe), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "PEFT" in err and "--base takes" not in err


def test_a_dead_searchs_staged_report_file_is_removed_by_the_next_run(tmp_path):
    """hp54 c50: a search killed while writing results.md left `.tiesmerge-file-<host>-<pid>-*` in its --dir, and no
    later search removed it: --dir is among the paths kept out of the caches, and everything in it counted as in use."""
    from tiesmerge.io.card import digest_cache_kept_out_of
    from tiesmerge.io.writer import remove_stale
    from tiesmerge.scratch import host_tag

    stale = tmp_path / f".tiesmerge-file-{host_tag()}-999999-k3j_x9ab"  # pid 999999: no such process
    stale.write_text("half a results.md")
    with digest_cache_kept_out_of([tmp_path]):  # as a search holds its --dir
        assert remove_stale(tmp_path) == [stale.name]
    assert not stale.exists()


def test_an_edited_adapt_checkpoint_is_refused_as_such_not_as_a_bug():
    """hp54 c24-c27: an adapt checkpoint whose fingerprint's data was [1, 2], or whose step, entropy or Adam settings
    held a 401-digit integer, was "an unexpected TypeError/OverflowError ... a bug in tiesmerge" on resume."""
    import json

    from tiesmerge.adamerging.learn import _differing_parts, _finite

    there = json.dumps({"format": "f", "data": [1, 2]})
    now = json.dumps({"format": "f", "data": [["task0", "abc"]]})
    assert _differing_parts(there, now) == ["its fingerprint is not one tiesmerge writes (edited or damaged)"]
    assert not _finite(10 ** 400) and _finite(3) and not _finite(float("nan"))
    # hp70b c46: nested past Python's limit, or a key given twice: damage, never "another run" to resume
    for damaged in ("[" * 100000 + "]" * 100000, '{"format": "f", "forward": 1, "forward": 2}'):
        wrapped = damaged if damaged.startswith("{") else '{"format": "f", "data": ' + damaged + "}"
        assert _differing_parts(wrapped, now) == ["its fingerprint is not one tiesmerge writes (edited or damaged)"]
    assert _differing_parts("0123abcd", now) == []  # a bare digest of an older checkpoint: no parts to compare
    from pathlib import Path

    import pytest

    from tiesmerge.adamerging.learn import _fingerprint_check
    from tiesmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="ck.pt: the checkpoint's fingerprint is not one tiesmerge writes") as caught:
        _fingerprint_check('{"format": "f", "forward": 1, "forward": 2}', now, Path("ck.pt"))
    assert "remove the checkpoint" in caught.value.hint and "same command" not in caught.value.hint


def test_integer_grid_values_are_read_as_written():
    """hp54 c30, c29: --grid seed=9007199254740993,9007199254740992 was read through float: one candidate, the first
    seed never tried; a seed too large was shown float-rounded."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.search import parse_grid

    assert parse_grid("dare_ties", ["seed=9007199254740993,9007199254740992"])["seed"] == (9007199254740993,
                                                                                           9007199254740992)
    with pytest.raises(ConfigError, match=r"got 12345678901234567890123$|got 12345678901234567890123\b"):
        parse_grid("dare_ties", ["seed=12345678901234567890123,1"])


def test_a_budget_of_zero_for_cmaes_is_hinted_with_a_budget():
    """hp54 c42: cmaes with --budget 0 was hinted "leave --budget out for the whole grid", which cmaes refuses."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.space import build_space
    from tiesmerge.tuning.strategies import make_strategy

    space = build_space("ties", 2, axes=("lam",))
    with pytest.raises(ConfigError) as caught:
        make_strategy("cmaes", space, budget=0)
    assert "give the cmaes strategy a budget" in caught.value.hint


def test_the_best_merge_may_go_in_a_folder_inside_the_search_dir(tmp_path):
    """hp54 c07: `search --dir d -o d/best` was refused as "the best merge would replace the search's log"."""
    from tiesmerge.cli.main import main

    base, fts = make_family(2)
    write_hf_dir(tmp_path / "base", base)
    models = [str(write_hf_dir(tmp_path / f"ft{k}", ft)) for k, ft in enumerate(fts)]
    (tmp_path / "ev_best.py").write_text("def score(state):\n    return float(sum(t.double().sum() for t in "
                                         "state.values()))\n")
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["search", "--base", str(tmp_path / "base"), "--model", models[0], "--model", models[1],
                     "--evaluator", "ev_best:score", "--grid", "density=0.2", "--grid", "lam=1", "--dir",
                     str(tmp_path / "d"), "-o", str(tmp_path / "d" / "best")]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    assert (tmp_path / "d" / "best" / "tiesmerge.json").is_file() and (tmp_path / "d" / "log.jsonl").is_file()


def test_an_integer_range_past_2_53_is_refused():
    """hp54 c59: --range seed=9007199254740993:9007199254741003 sampled seed 9007199254740992, below the range."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.space import build_space

    with pytest.raises(ConfigError, match=r"seed's range .* lies past 2\*\*53, .* --grid seed=v1,v2"):
        build_space("dare_ties", 2, axes=("seed",), ranges={"seed": (9007199254740993.0, 9007199254741003.0)})
    build_space("dare_ties", 2, axes=("seed",), ranges={"seed": (0.0, 1000.0)})
    build_space("dare_ties", 2, axes=("seed",), grid={"seed": (10 ** 16,)})  # hp55 c63b: a grid value is no range


def test_a_damaged_heads_file_exits_as_a_data_file_does(tmp_path):
    """hp54 c12: --heads or --choices JSON nested 3,000 deep exited 1 (a damaged model) where the same damage in a data
    file exits 2 (the user's input)."""
    from tiesmerge.cli.adapt import _json_mapping
    from tiesmerge.errors import ConfigError

    heads = tmp_path / "heads.json"
    heads.write_text("[" * 3000 + "]" * 3000)
    with pytest.raises(ConfigError, match="nested too deep"):
        _json_mapping(str(heads), "the heads")
    heads.write_text('{"sst2": ["bad", "good"], "sst2": ["good", "bad"]}')  # hp68b c37: the last kept silently
    with pytest.raises(ConfigError, match="gives the key 'sst2' twice"):
        _json_mapping(str(heads), "the heads")


def test_a_dry_run_with_an_output_checks_its_free_space(tmp_path, capsys, monkeypatch):
    """hp54 c43: `merge --dry-run -o OUT` exited 0 with an output size past the free space, where the real run
    refused at once."""
    import collections
    import shutil

    from tiesmerge.cli.main import main

    base, fts = make_family(2)
    write_hf_dir(tmp_path / "base", base)
    models = [str(write_hf_dir(tmp_path / f"ft{k}", ft)) for k, ft in enumerate(fts)]
    args = ["merge", "--base", str(tmp_path / "base"), "--model", models[0], "--model", models[1], "--dry-run", "-o",
            str(tmp_path / "out")]
    assert main(args) == 0
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 0, 10))
    assert main(args) == 1
    assert "the output needs" in (err := capsys.readouterr().err) and "but only 10 B is free there" in err


def test_an_option_value_nested_past_reprs_depth_is_a_typed_error(tmp_path):
    """hp55 c17: `tiesmerge.merge(..., "ties:density=" + "[" * 990 + "0.5" + "]" * 990)` was a RecursionError from
    the message's repr of the value (900 and 998+ deep were typed)."""
    import tiesmerge
    from tiesmerge.errors import ConfigError
    from tiesmerge.methods.base import _shown

    base, fts = make_family(2)
    with pytest.raises(ConfigError):
        tiesmerge.merge(base, fts, "ties:density=" + "[" * 990 + "0.5" + "]" * 990)
    deep = 0.5
    for _ in range(5000):  # past any stack: the message's repr is bounded, whatever the depth left
        deep = [deep]
    assert _shown(deep).startswith("[[[[[[") and len(_shown(deep)) <= 80


def test_an_output_that_is_the_search_dir_through_a_bind_mount_is_refused_first(tmp_path):
    """hp55 c21: `search --dir src/d -o mnt/d` (mnt a bind mount of src) ran the whole search, then refused the output
    as a folder tiesmerge did not write. Refused before the search (needs root for the mount; skipped otherwise)."""
    import subprocess

    from tiesmerge.paths import held_through_mount as _through_a_mount

    (tmp_path / "src" / "d").mkdir(parents=True)
    (tmp_path / "mnt").mkdir()
    if subprocess.run(["mount", "--bind", str(tmp_path / "src"), str(tmp_path / "mnt")],
                      capture_output=True).returncode != 0:
        pytest.skip("no bind mount here (needs root)")
    try:
        assert _through_a_mount(str(tmp_path / "src" / "d"), str(tmp_path / "mnt" / "d"))
        assert _through_a_mount(str(tmp_path / "src" / "d"), str(tmp_path / "mnt"))
        assert not _through_a_mount(str(tmp_path / "src" / "d"), str(tmp_path / "mnt" / "d" / "best"))
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], capture_output=True)


def test_damaged_records_of_tiesmerges_own_files_are_said_damaged(tmp_path):
    """hp55 c38: a damaged report-stamps file made the resume say results.md and report.html "changed since the search
    wrote them" (they had not); c49: a damaged tune --json file was "a file tiesmerge wrote as tune's --json scores,
    not as --json"."""
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import SEARCH_STAMPS, check_output_file, check_report_unchanged
    from tiesmerge.tuning import run_search
    from tiesmerge.tuning.report import write_report

    base, models = make_family(2)
    result = run_search(base, models, "ties", _sign_above(float("inf")), grid={"density": (0.2,), "lam": (1.0,)},
                        log=str(tmp_path / "log.jsonl"))
    write_report(result, tmp_path)
    (tmp_path / SEARCH_STAMPS).write_text("[" * 100000)
    with pytest.raises(OutputError, match="record of its report files is damaged, so whether results.md and "
                                          "report.html changed .* cannot be told"):
        check_report_unchanged(tmp_path)
    for entry in ('["a", 1, 2]', "[1e400, 1, 2]", "null", "[-1, -1, -1]"):  # hp69b c36: entries that are no stamp
        (tmp_path / SEARCH_STAMPS).write_text(f'{{"results.md": {entry}, "report.html": {entry}}}')
        with pytest.raises(OutputError, match="record of its report files is damaged"):
            check_report_unchanged(tmp_path)
    (tmp_path / SEARCH_STAMPS).unlink()  # deleted: said as missing, not as the user's edits (hp61b)
    with pytest.raises(OutputError, match="record of its report files is missing, so whether") as err:
        check_report_unchanged(tmp_path)
    assert SEARCH_STAMPS not in err.value.hint
    scores = tmp_path / "t.json"
    scores.write_text('{"method": "ties", "points": [], "x": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(OutputError, match="tune's --json scores, which no longer reads as one"):
        check_output_file(scores, True, [], "--json", ours=lambda p: False)


def test_a_score_past_a_floats_range_is_shown_as_returned():
    """hp55 c43-c45: an evaluator returning Fraction(10**400, 3) was shown by its numerator's digits, and a finite
    Decimal('1e999999') or np.longdouble('1e4000') as "returned inf"."""
    import decimal
    import fractions

    import numpy as np

    from tiesmerge.errors import EvaluatorError
    from tiesmerge.tuning.evaluator import guard

    for value, said in ((fractions.Fraction(10 ** 400, 3), "a fraction of about 1e400"),
                        (decimal.Decimal("1e999999"), "1.000e+999999, a finite number past a float's range"),
                        (np.longdouble("1e4000"), "e+4000, a finite number past a float's range")):
        with pytest.raises(EvaluatorError, match=said.replace("+", r"\+").replace("(", r"\(")):
            guard(lambda state, value=value: value, "e", finite=True)({})


def test_a_note_inside_a_tune_scores_file_keeps_it_from_force(tmp_path):
    """hp55 c51: `tune --json --force` replaced a scores file whose "best" held the user's note (only the top-level
    keys were compared); hp55 c04: a 5,000-digit integer in a search log's header was "a bug in tiesmerge"."""
    import json

    from tiesmerge.cli.commands import _is_scores_file
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.results_log import FORMAT, ResultsLog

    written = {"method": "ties", "best": {"density": 0.2, "lam": 1.0, "score": 0.5},
               "points": [{"density": 0.2, "lam": 1.0, "score": 0.5}, {"density": 0.5, "lam": 1.0, "score": 0.4}]}
    scores = tmp_path / "s.json"
    scores.write_text(json.dumps(written))
    assert _is_scores_file(scores)
    scores.write_text(json.dumps({**written, "best": {**written["best"], "note": "use this one"}}))
    assert not _is_scores_file(scores)
    log = tmp_path / "log.jsonl"
    log.write_text(f'{{"format": "{FORMAT}", "x": {"9" * 5000}}}\n')
    with pytest.raises(ConfigError, match="the search log is corrupt"):
        ResultsLog(log, {"method": "ties"})


def test_a_search_dir_whose_log_header_passes_4_kib_is_the_searchs_own(tmp_path):
    """hp55 c59: an evaluator named by 4,100 characters put the log header's format marker past its first 4 KiB, and
    the same command, run again, refused the search's own --dir as "files that are not a tiesmerge search's"."""
    from tiesmerge.paths import check_search_dir
    from tiesmerge.tuning.results_log import ResultsLog

    log = ResultsLog(tmp_path / "log.jsonl", {"evaluator": "e" * 5000, "method": "ties"})
    log.append({"key": "{}", "options": {}, "score": 1.0, "seconds": 1.0})
    log.close()
    check_search_dir(tmp_path)


def test_a_search_dir_that_is_a_dangling_link_is_said_so(tmp_path):
    """hp55 c70/c71: a --dir that is a link to a missing folder failed as "File exists", with a hint about the
    output."""
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_search_dir

    (tmp_path / "d").symlink_to(tmp_path / "missing")
    with pytest.raises(OutputError, match=r"--dir is a symbolic link to .*missing', which does not exist"):
        check_search_dir(tmp_path / "d")


def test_an_overflowing_adapters_error_is_no_rank_advice():
    """hp55 c64: a merged adapter that overflowed warned "relative error of nan ... pass a larger --rank"."""
    import warnings

    from tiesmerge.io.adapter_writer import _warn_truncation

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_truncation({"m": float("nan"), "n": 0.01}, sink=None)


def test_a_model_that_leaves_a_tensor_alone_is_no_tie_excess(tmp_path):
    """hp55 c84: TIES per tensor over adapters of different modules warned "many entries tie at the trim's threshold
    ... 60%": the ties were the zeros of tensors one adapter leaves alone (threshold 0), which change nothing."""
    import warnings

    import tiesmerge
    from helpers_adapters import LORA_MODULES, random_lora, write_lora_dir

    base, _ = make_family(1)
    write_hf_dir(tmp_path / "base", base)
    write_lora_dir(tmp_path / "all", random_lora(base, 2, seed=0), alpha=4.0)
    write_lora_dir(tmp_path / "one", random_lora(base, 2, seed=1, modules=LORA_MODULES[-1:]), alpha=4.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiesmerge.merge(tmp_path / "base", [tmp_path / "all", tmp_path / "one"], "ties:scope=per_tensor")
    assert not [w for w in caught if "tie at the trim's threshold" in str(w.message)]


def test_a_fifo_at_a_search_log_beside_a_json_output_does_not_block(tmp_path):
    """Review of the hp53 c14 fix: naming a search's report read log.jsonl beside it with open(), which blocks on a
    FIFO planted there; it is read only as a regular file."""
    import os
    import threading

    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file

    os.mkfifo(tmp_path / "log.jsonl")
    (tmp_path / "results.md").write_text("notes")
    raised: list[BaseException] = []

    def check():
        try:
            check_output_file(tmp_path / "results.md", True, [], "--json")
        except OutputError as exc:
            raised.append(exc)

    worker = threading.Thread(target=check, daemon=True)
    worker.start(), worker.join(20)
    assert not worker.is_alive() and raised and "tiesmerge did not write" in str(raised[0])


def test_tensor_names_apart_only_in_unicode_normalization_are_said_so():
    """hp71a c38: a base's 'café.w' (composed é) and a model's 'café.w' (e + a combining accent) were named as missing
    and extra in words that print alike; the hint now says how they differ."""
    import unicodedata

    import tiesmerge
    from tiesmerge.errors import IncompatibleCheckpointsError

    nfc, nfd = unicodedata.normalize("NFC", "café.w"), unicodedata.normalize("NFD", "café.w")
    with pytest.raises(IncompatibleCheckpointsError) as caught:
        tiesmerge.merge({nfc: torch.zeros(3)}, [{nfd: torch.ones(3)}], "ties")
    assert "(U+00E9)" in caught.value.hint and "(U+0301)" in caught.value.hint
    assert "differ only in Unicode normalization" in caught.value.hint


def test_an_exact_density_that_no_float_is_says_which_float_counts():
    """hp70a c13: density=Fraction(1, 3) became the float 0.3333333333333333 and ⌊that · 3⌋ kept no entry of 3 (not
    the 1 of the exact number), said only as "the density keeps no entry"; a float that is the number written
    (Decimal("0.5")) or an option that counts nothing (weights) is not warned of."""
    import warnings
    from decimal import Decimal
    from fractions import Fraction

    import tiesmerge
    from tiesmerge.errors import MergeWarning

    base, models = {"w": torch.zeros(3)}, [{"w": torch.tensor([1.0, 2.0, 3.0])}]
    two = [{"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([3.0, 2.0, 1.0])}]
    with pytest.warns(MergeWarning, match=r"density = Fraction\(1, 3\) is used as the float 0\.3333333333333333"):
        tiesmerge.merge(base, models, "magnitude_prune", density=Fraction(1, 3), scope="per_tensor")
    with pytest.warns(MergeWarning, match=r"densities\[0\] = Fraction\(1, 3\)"):
        tiesmerge.merge(base, two, "ties", densities=[Fraction(1, 3), Decimal("0.5")])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tiesmerge.merge(base, models, "magnitude_prune", density=Decimal("0.5"), scope="per_tensor")
        tiesmerge.merge(base, two, "task_arithmetic", weights=[Fraction(1, 3), Fraction(2, 3)])
    assert not [w for w in seen if "is used as the float" in str(w.message)]
