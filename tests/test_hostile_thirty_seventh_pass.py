"""Hostile pass 37 (issue 13), and the notes of pass 36 left for it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

import tiesmerge
from helpers_adapters import random_ia3, write_ia3_dir
from helpers_ckpt import make_base, write_hf_dir
from test_hub_cache import hub  # noqa: F401, F811 - the fixture of a Hugging Face cache


def test_analyze_measures_ia3_adapters_on_their_scaling_vectors(tmp_path):
    """hp36 C60: analyze measured (IA)³ adapters in weight space (W·(l − 1): 6,144 parameters, sign conflicts of that),
    while `tiesmerge merge` trims, elects and averages l − 1 (192 entries): the report described another merge."""
    base = make_base(2)
    write_hf_dir(tmp_path / "base", base)
    vectors = [random_ia3(base, seed=k) for k in range(3)]
    dirs = [write_ia3_dir(tmp_path / f"ia3_{k}", v) for k, v in enumerate(vectors)]
    report = tiesmerge.analyze(tmp_path / "base", dirs, density=0.2)
    # the reference: the same analysis of τ = l − 1, fed as dense vectors against an all-ones base
    ones = {m: torch.ones_like(v) for m, v in vectors[0].items()}
    expected = tiesmerge.analyze(ones, [dict(v) for v in vectors], density=0.2)
    assert report["parameters"] == sum(v.numel() for v in vectors[0].values())
    assert report["kept_per_model"] == expected["kept_per_model"]
    assert report["thresholds"] == pytest.approx(expected["thresholds"])
    assert report["sign_conflicts"]["by_size"] == expected["sign_conflicts"]["by_size"]
    assert "scaling vectors" in report["inputs"]["measured"]
    assert report["summary"][0].startswith("Measured: (IA)³ scaling vectors")


def test_analyze_refuses_a_compared_merge_of_ia3_adapters(tmp_path):
    """A compared merge (--method) of (IA)³ adapters is written folded into the weights: its magnitudes would not be
    the quantities the statistics measure (l − 1)."""
    from tiesmerge.errors import ConfigError

    base = make_base(2)
    write_hf_dir(tmp_path / "base", base)
    dirs = [write_ia3_dir(tmp_path / f"ia3_{k}", random_ia3(base, seed=k)) for k in range(2)]
    with pytest.raises(ConfigError, match=r"--method with \(IA\)³ adapters"):
        tiesmerge.analyze(tmp_path / "base", dirs, methods=["ties"])


def test_ia3_vectors_fold_in_float32_and_only_the_product_takes_a_float16_dtype(tmp_path):
    """hp36 C37: with --dtype float16 the merged (IA)³ vectors l = 1 + λτ were cast to float16 before the fold: a large
    λ overflowed l (past 65504) where W·l fits float16, and the error named the output dtype F32."""
    from safetensors.torch import load_file

    from tiesmerge.finite import NotFiniteError
    from tiesmerge.methods import TaskArithmetic

    base = {k: v * 1e-3 for k, v in make_base(2).items()}  # small weights: W·l fits float16 where l does not
    write_hf_dir(tmp_path / "base", base)
    dirs = [write_ia3_dir(tmp_path / f"ia3_{k}", random_ia3(base, seed=k)) for k in range(2)]
    method = TaskArithmetic(lam=1e6)  # l − 1 ≈ 1e6 · 0.2 ≈ 2e5, past float16's 65504
    full = tiesmerge.merge(tmp_path / "base", dirs, method, output=tmp_path / "f32")
    half = tiesmerge.merge(tmp_path / "base", dirs, method, output=tmp_path / "f16", dtype="float16")
    wide, narrow = load_file(str(full / "model.safetensors")), load_file(str(half / "model.safetensors"))
    for name, value in wide.items():
        assert narrow[name].dtype == torch.float16
        assert torch.equal(narrow[name], value.to(torch.float16)), name
    # a product past float16 is still refused, and the message names the dtype asked for
    with pytest.raises(NotFiniteError, match=r"in the output dtype F16"):
        tiesmerge.merge(tmp_path / "base", dirs, TaskArithmetic(lam=1e10), output=tmp_path / "bad", dtype="float16")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("made_by_user", [False, True])
def test_a_failed_or_stopped_demo_leaves_nothing_in_a_workdir_it_made(tmp_path, capsys, monkeypatch, made_by_user):
    """hp36 C33: a demo that failed writing its models (a full disk, a file size limit) left its --workdir with a
    half-written base/ and a marker saying "writing": on a full disk that space stayed taken until the next demo. A
    folder this demo made (or found empty) is emptied again; the user's empty folder itself stays."""
    from helpers_ckpt import run_cli
    from tiesmerge.cli import demo
    from tiesmerge.errors import OutputError

    wd = tmp_path / "wd"
    if made_by_user:
        wd.mkdir()

    def full_disk(workdir, million_params):
        (Path(workdir) / "base").mkdir()
        (Path(workdir) / "base" / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 10)
        raise OutputError(f"{workdir}/base/model-00001-of-00002.safetensors: cannot write it: no space left")

    monkeypatch.setattr(demo, "run_demo", full_disk)
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)
    assert rc != 0 and "no space left" in err, err
    assert (sorted(os.listdir(wd)) == [] if made_by_user else not os.path.lexists(wd)), os.listdir(tmp_path)

    def stopped(workdir, million_params):
        (Path(workdir) / "base").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", stopped)
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)
    said = f"the demo's files in --workdir {wd} were removed" if made_by_user else \
        f"the demo's files in the new --workdir {wd} were removed"
    assert rc == 130 and f"interrupted; {said}" in err, err
    assert (sorted(os.listdir(wd)) == [] if made_by_user else not os.path.lexists(wd))


@pytest.mark.parametrize("engine", ["fused", "torch"])
def test_agreeing_weights_that_sum_to_zero_divide_by_one_as_mergekit(engine, monkeypatch):
    """hp37b M02: TIES's weighted mean with weights +1 and −1 (mergekit's ties with normalize: true) wrote no change
    where both models agree (the agreeing weights sum to 0), while mergekit divides by 1 there: τa − τb."""
    from tiesmerge.methods import Ties

    if engine == "torch":
        monkeypatch.setenv("TIESMERGE_KERNELS", "0")
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g)}
    taus = [torch.randn(64, 64, generator=g) for _ in range(2)]
    models = [{"w": base["w"] + t} for t in taus]
    merged = tiesmerge.merge(base, models, Ties(density=1.0, weights=(1.0, -1.0), scope="per_tensor"))["w"]
    # the reference, in float64: weighted values, election on their sum, agreeing ones summed, divided by the sum of
    # the agreeing weights, or by 1 where that is 0
    w = torch.tensor([1.0, -1.0], dtype=torch.float64).view(2, 1, 1)
    weighted = torch.stack(taus).double() * w
    gamma = weighted.sum(0).sign()
    agree = (weighted.sign() == gamma) & (weighted != 0)
    denom = (agree * w).sum(0)
    expected = (weighted * agree).sum(0) / torch.where(denom == 0, torch.ones_like(denom), denom)
    both = agree.all(0)
    assert both.any()  # the entries of the defect: both models agree, their weights sum to 0
    torch.testing.assert_close(merged - base["w"], expected.float(), atol=1e-6, rtol=1e-6)
    assert (merged - base["w"])[both].abs().min() > 0


def test_mergekit_linear_merges_a_base_model_the_models_do_not_list(tmp_path, capsys):
    """hp37b M05: mergekit's linear with a base_model not listed among models: mergekit adds it as one more input
    (after the listed ones, with the shared parameters) and stops without a shared weight; tiesmerge merged the listed
    models alone and ignored base_model."""
    from safetensors.torch import load_file

    from helpers_ckpt import run_cli

    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)} for _ in range(3)]
    dirs = [write_hf_dir(tmp_path / name, s) for name, s in zip(("base", "a", "b"), states)]
    recipe = tmp_path / "r.yaml"
    body = (f"merge_method: linear\nbase_model: {dirs[0]}\nmodels:\n  - model: {dirs[1]}\n    parameters: "
            f"{{weight: 0.3}}\n  - model: {dirs[2]}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    recipe.write_text(body)
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "o1"], capsys)
    assert rc == 2 and "base_model" in err and "Missing required parameter weight" in err, err
    assert not (tmp_path / "o1").exists()
    recipe.write_text(body + "parameters: {weight: 0.2}\n")
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "o2"], capsys)
    assert rc == 0, err
    merged = load_file(str(tmp_path / "o2" / "model.safetensors"))
    for name in ("w", "b"):
        expected = (0.3 * states[1][name].double() + 0.5 * states[2][name].double()
                    + 0.2 * states[0][name].double()) / 1.0
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-6, rtol=1e-6)


def test_a_search_range_or_grid_outside_the_named_axes_is_refused_and_without_axes_is_searched():
    """hp37 C16: `search --axis lam --range density=0.3:0.4` (or `--grid density=0.3`, `--range weights=...`) merged
    every candidate at the default density without a word: the option was neither searched nor held."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.space import build_space

    with pytest.raises(ConfigError, match=r"--range density names an option the search does not vary .*"
                                          r"add --axis density to search it, or hold it with --set density=VALUE"):
        build_space("ties", 2, axes=["lam"], ranges={"density": (0.3, 0.4)})
    with pytest.raises(ConfigError, match=r"--grid density names an option the search does not vary"):
        build_space("ties", 2, axes=["lam"], grid={"density": (0.3,)})
    with pytest.raises(ConfigError, match=r"--range weights names an option"):
        build_space("ties", 2, axes=["lam"], ranges={"weights": (0.2, 0.3)})
    # no --axis: an option given a range is one more axis, sampled in that range
    space = build_space("ties", 2, ranges={"weights": (0.2, 0.3)})
    assert [a.name for a in space.axes][-1] == "weights"
    for u in (0.0, 0.5, 1.0):
        options = space.from_unit([u] * space.dimension)
        assert all(0.2 <= w <= 0.3 for w in options["weights"]), options
    # the paper's grid handed over by the command line is not the user's: no refusal for it
    assert [a.name for a in build_space("ties", 2, axes=["lam"], grid={"density": (0.1, 0.2, 0.3)}).axes] == ["lam"]


def test_an_ia3_fold_into_bfloat16_rounds_once(tmp_path):
    """hp37 C10: an (IA)³ adapter with l = 1.0019 folded with --dtype bfloat16 vanished (the output was bf16(W)):
    l was rounded to bf16 (1.0) before the product. Now W·l is computed in float32 and rounded once, as PEFT's
    merge_and_unload of a float32 model then cast."""
    from safetensors.torch import load_file

    from helpers_adapters import IA3_MODULES
    from tiesmerge.methods import TaskArithmetic

    base = make_base(2)
    write_hf_dir(tmp_path / "base", base)
    vectors = {}
    for module, feedforward in IA3_MODULES.items():
        rows, cols = base[module + ".weight"].shape
        vectors[module] = torch.full((1, cols) if feedforward else (rows, 1), 1.0019)
    adapter = write_ia3_dir(tmp_path / "a", vectors)
    out = tiesmerge.merge(tmp_path / "base", [adapter], TaskArithmetic(lam=1.0), output=tmp_path / "o",
                          dtype="bfloat16")
    merged = load_file(str(out / "model.safetensors"))
    for module in IA3_MODULES:
        name = module + ".weight"
        assert torch.equal(merged[name], (base[name].double() * vectors[module].double()).to(torch.bfloat16)), name
        assert not torch.equal(merged[name], base[name].to(torch.bfloat16))


@pytest.mark.parametrize("kind", ["tiesmerge", "mergekit"])
def test_a_missing_recipe_path_says_against_which_folder_it_was_read(tmp_path, capsys, monkeypatch, kind):
    """hp37 C05: a mergekit recipe run from another folder failed with "../llama-base: no such file or directory" /
    "check the path of the model": mergekit recipes read their paths against the working folder, tiesmerge recipes
    against the recipe's folder, and neither the message nor the README said which."""
    from helpers_ckpt import run_cli

    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "r.yaml"
    if kind == "mergekit":
        recipe.write_text("merge_method: ties\nbase_model: ../base\nmodels:\n  - model: ../a\n    parameters: "
                          "{weight: 1, density: 0.5}\n")
    else:
        recipe.write_text("method: ties\nbase: ../base\nmodels: [../a, ../b]\n")
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(["merge", "recipes/r.yaml", "-o", "out"], capsys)
    assert rc != 0 and "no such file or directory" in err, err
    if kind == "mergekit":
        assert f"paths in a mergekit recipe are relative to the working folder ({tmp_path})" in err, err
    else:
        assert f"paths in a tiesmerge recipe are relative to the recipe's folder ({tmp_path / 'recipes'})" in err, err


def test_a_search_resumed_after_a_helper_of_its_evaluator_was_edited_is_refused(tmp_path, monkeypatch):
    """hp37 C19: only the evaluator's own file was in the log's digest: after a helper module it imports was edited
    (its threshold changed), a resumed search mixed scores of two evaluators and chose its best across them."""
    import importlib
    import sys

    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "c19_helper.py").write_text("SIGN = 1.0\n")
    (tmp_path / "c19_eval.py").write_text("import c19_helper\n\n\ndef score(state):\n    return c19_helper.SIGN\n")
    base, models = make_family(2)
    import c19_eval

    grid = {"density": (0.5,), "lam": (1.0,)}
    log = str(tmp_path / "log.jsonl")
    run_search(base, models, "ties", c19_eval.score, grid=grid, log=log)
    run_search(base, models, "ties", c19_eval.score, grid=grid, log=log)  # the same code: resumes
    (tmp_path / "c19_helper.py").write_text("SIGN = -1.0\n")
    importlib.reload(sys.modules["c19_helper"])
    with pytest.raises(ConfigError, match="is the log of another search .*the evaluator.s code"):
        run_search(base, models, "ties", c19_eval.score, grid=grid, log=log)


def _yaml_after(text: str, marker: str) -> str:
    """The indented block after ``marker`` (the --help epilog's files), or the ```yaml fence after it (README)."""
    import textwrap

    rest = text[text.index(marker) + len(marker):]
    if "```yaml" in rest.split("\n\n")[0] + rest[:40]:
        return rest.split("```yaml\n", 1)[1].split("```", 1)[0]
    block = rest.lstrip("\n").split("\n\n", 1)[0]
    return textwrap.dedent(block) + "\n"


@pytest.mark.parametrize("where", ["help", "readme"])
def test_the_documented_recipe_examples_run_as_written(tmp_path, capsys, monkeypatch, where):
    """hp37b P03: `merge --help`'s recipe.yaml (models: [./ft-math, {path: ./ft-code, weight: 0.5}]) was refused as
    written ("give a weight to every model or to none"), and so was the README's; P05: three examples of the help lost
    their line continuation (a single backslash in the source joined the two lines)."""
    from helpers_ckpt import make_family, run_cli
    from tiesmerge.cli.examples import MERGE_EXAMPLES

    if where == "help":
        recipe, names = _yaml_after(MERGE_EXAMPLES, "recipe.yaml:"), ("base", "ft-math", "ft-code")
        from tiesmerge.cli.adapt import ADAPT_EXAMPLES
        from tiesmerge.cli.examples import ANALYZE_EXAMPLES, SEARCH_EXAMPLES, STATS_EXAMPLES, TUNE_EXAMPLES

        lines = [x for text in (MERGE_EXAMPLES, ADAPT_EXAMPLES, ANALYZE_EXAMPLES, SEARCH_EXAMPLES, STATS_EXAMPLES,
                                TUNE_EXAMPLES) for x in text.splitlines()]
        for line, after in zip(lines, lines[1:]):
            if line.rstrip().endswith("\\"):
                assert after.startswith("      "), (line, after)  # the continuation is its own, indented line
        assert not any("      --" in line for line in lines if line.lstrip().startswith("tiesmerge ")), lines
    else:
        readme = (Path(__file__).parents[1] / "README.md").read_text()
        recipe, names = _yaml_after(readme, "`recipe.yaml`:"), ("llama-base", "llama-math", "llama-code")
    base, models = make_family(2)
    for name, state in zip(names, (base, *models)):
        write_hf_dir(tmp_path / name, state)
    (tmp_path / "recipe.yaml").write_text(recipe)
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(["merge", "recipe.yaml", "-o", "merged", "--dry-run"], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["validate", "recipe.yaml"], capsys)
    assert rc == 0, err


def test_a_path_of_bytes_that_are_no_utf8_is_shown_with_x_escapes(tmp_path, capsys):
    """hp37b E06: paths with bytes that are no UTF-8 (caf\\xe9) were shown as caf\\udce9 in every message and in the
    card's text, though the README promised \\xNN escapes. The card's recipe keeps the surrogate (it reads back as the
    same file) and re-runs."""
    import yaml
    from safetensors.torch import load

    from helpers_ckpt import make_family, run_cli

    base, models = make_family(2)
    root = os.fsencode(tmp_path) + b"/caf\xe9"
    os.makedirs(root)
    paths = [os.fsdecode(root + name) for name in (b"/base", b"/ft-\xff0", b"/ft-\xff1")]
    for path, state in zip(paths, (base, *models)):
        write_hf_dir(path, state)
    out = os.fsdecode(root + b"/out\xfe")
    rc, stdout, err = run_cli(["merge", "--base", paths[0], "--model", paths[1], "--model", paths[2], "-o", out],
                              capsys)
    assert rc == 0, err
    assert "caf\\xe9/out\\xfe" in stdout and "udc" not in stdout.lower(), stdout
    card = (Path(out) / "README.md").read_text(encoding="utf-8")
    assert "caf\\xe9/ft-\\xff0`" in card
    rc, _, err = run_cli(["merge", "--base", paths[0], "--model", paths[1], "--model", paths[2], "-o", out], capsys)
    assert rc != 0 and "caf\\xe9/out\\xfe" in err and "udc" not in err.lower(), err
    recipe = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe)["base"] == paths[0]  # the same file name, byte for byte
    (tmp_path / "r.yaml").write_text(recipe, encoding="utf-8")
    rc, _, err = run_cli(["merge", tmp_path / "r.yaml", "-o", tmp_path / "again"], capsys)
    assert rc == 0, err
    first = load((Path(out) / "model.safetensors").read_bytes())  # safetensors opens only UTF-8 paths itself
    second = load((tmp_path / "again" / "model.safetensors").read_bytes())
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_tune_never_chooses_a_nan_score():
    """hp37b A18: `tune` with an evaluator returning NaN returned the NaN point as its best; a NaN first point even
    stayed best when later points scored finite numbers (no number compares greater than NaN)."""
    import math

    from helpers_ckpt import make_family
    from tiesmerge.errors import EvaluatorError
    from tiesmerge.tuning import tune

    base, models = make_family(2)
    scores = iter([math.nan, 0.5, 0.7, 0.6])
    result = tune(base, models, "ties", lambda state: next(scores), grid={"density": (0.5,), "lam": (0.8, 1.0, 1.2,
                                                                                                    1.4)})
    assert result.best.score == 0.7 and result.best.lam == 1.2
    with pytest.raises(EvaluatorError, match="no grid point got a finite score"):
        tune(base, models, "ties", lambda state: math.nan, grid={"density": (0.5,), "lam": (1.0,)})


def test_a_method_class_or_name_where_a_config_is_expected_is_handled():
    """hp37b A16, A22: `describe_plan(plan, "ties", 2)` and `merge(base, models, Ties)` were bare TypeErrors."""
    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError
    from tiesmerge.methods import Ties

    base, models = make_family(2)
    plan = tiesmerge.plan_merge(base, models, "ties")
    assert tiesmerge.describe_plan(plan, "ties", 2) == tiesmerge.describe_plan(plan, Ties(), 2)
    with pytest.raises(ConfigError, match=r"method Ties is a class, not a method config") as caught:
        tiesmerge.merge(base, models, Ties)
    assert "Ties()" in caught.value.hint
    with pytest.raises(ConfigError, match=r"is a class"):
        tiesmerge.analyze(base, models, methods=[Ties])


@pytest.mark.parametrize("method", ["linear", "nuslerp", "ties"])  # ties: the inputs' own check says it
def test_a_mergekit_recipe_listing_a_model_twice_says_so(tmp_path, capsys, method):
    """hp37b M10: a mergekit linear recipe (no base_model) listing ft-a twice was refused as "model 0 (ft-a) is the
    base itself" / "list only the fine-tuned models after the base": the recipe has no base (hp73a c12: nuslerp
    too)."""
    from helpers_ckpt import make_family, run_cli

    base, models = make_family(1)
    b, a = write_hf_dir(tmp_path / "base", base), write_hf_dir(tmp_path / "ft-a", models[0])
    extra = f"base_model: {b}\n" if method == "ties" else ""
    (tmp_path / "r.yaml").write_text(f"merge_method: {method}\n{extra}models:\n"
                                     f"  - model: {a}\n    parameters: {{weight: 0.3, density: 0.5}}\n"
                                     f"  - model: {a}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
                                     .replace(", density: 0.5", "" if method != "ties" else ", density: 0.5"))
    rc, _, err = run_cli(["merge", tmp_path / "r.yaml", "-o", tmp_path / "o"], capsys)
    assert rc == 2 and "is listed twice" in err and "is the base itself" not in err, err


def test_the_dry_runs_peak_says_what_it_leaves_out():
    """hp37b P01: the dry run estimated 220 MiB where /usr/bin/time measured 361 MiB: the interpreter and the
    libraries a merge loads (~170 MiB) were not in the estimate, and nothing said so."""
    from helpers_ckpt import make_family

    base, models = make_family(2)
    text = tiesmerge.describe_plan(tiesmerge.plan_merge(base, models, "ties"), "ties", 2)
    line = next(x for x in text.splitlines() if x.startswith("peak memory"))
    assert "estimated for the merge's data" in line and "the process adds the interpreter" in line, line


def test_the_demos_space_check_counts_its_merges_and_the_files_it_replaces(tmp_path, capsys, monkeypatch):
    """hp37 C32: the demo's up-front space check counted the requested size's models only (2.67 MiB), and failed
    after two merges on a disk that could not hold the third; C33: a rerun in its own workdir was refused although
    the files it replaces would free the space."""
    from helpers_ckpt import run_cli
    from tiesmerge.cli import demo

    wd = tmp_path / "wd"
    wd.mkdir()
    needed, replaced = demo._space_needed(wd, 0.05)
    model = 2 * sum(math.prod(s) for s in demo.synthetic_llama_shapes(0.05).values())
    assert replaced == 0 and needed == model * (1 + len(demo.TASKS) + len(demo.METHODS))
    monkeypatch.setattr(demo, "_free_bytes", lambda root: needed - 1)
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)
    assert rc != 0 and "the demo's models and merges need" in err, err
    monkeypatch.undo()
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)
    assert rc == 0, err
    again, replaced = demo._space_needed(wd, 0.05)
    assert again == needed + model and replaced >= needed  # the earlier merges are rewritten beside themselves
    monkeypatch.setattr(demo, "_free_bytes", lambda root: again - replaced)
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)
    assert rc == 0, err


def test_an_adamerging_card_does_not_present_its_record_as_a_recipe():
    """hp37 C37: adapt's card put its record (method: adamerging) under "## Recipe", the heading whose block every other
    card's reader runs with `tiesmerge merge`; that fails ("unknown method 'adamerging'")."""
    from tiesmerge.io.card import model_card

    card = model_card(base_label="b", model_labels=["a", "c"], recipe_yaml="method: adamerging\n",
                      method_name="adamerging", paper="p", summary="s", version="0")
    assert "## Recipe" not in card and "## How it was made" in card and "is not a recipe `tiesmerge merge` runs" in card
    assert "## Recipe" in model_card(base_label="b", model_labels=["a"], recipe_yaml="method: ties\n",
                                     method_name="ties", paper="p", summary="s", version="0")


def test_one_warning_about_many_tensors_is_shown_a_few_times_then_counted(capsys):
    """hp37b M09: Model Stock printed one warning line per tensor whose t left [0, 1]: hundreds for a real model.
    The first three are shown, then one line counts the rest; warnings naming no tensor are never grouped."""
    import sys

    from tiesmerge.cli.main import _warning_printer
    from tiesmerge.errors import MergeWarning

    show = _warning_printer(lambda *a: None)
    for k in range(7):
        show(MergeWarning(f"model_stock: tensor 'layers.{k}.w' gets t = {1.5 + k / 10:.4g}, outside [0, 1]"),
             MergeWarning, "f", 1)
    for k in range(5):
        show(MergeWarning(f"model {k} is a copy of the base"), MergeWarning, "f", 1)
    show.summary()
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("warning:")]
    assert sum("model_stock: tensor 'layers." in x for x in lines) == 3, err
    assert "warning: ... and 4 more tensors with the same warning as the 3 above (model_stock: ...)" in err, err
    assert sum("is a copy of the base" in x for x in lines) == 5, err
    assert sys.stderr is not None


def test_bytes_paths_and_pathlikes_returning_bytes_work_everywhere(tmp_path):
    """hp37b A30: bytes paths, and os.PathLike objects whose __fspath__ returns bytes (how Python hands over a name
    that is no UTF-8), were bare TypeErrors in plan_merge, open_checkpoint, analyze(output=...) and merge."""
    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError

    base, models = make_family(2)
    dirs = [write_hf_dir(tmp_path / name, s) for name, s in zip(("base", "a", "b"), (base, *models))]

    class BytesPath:
        def __init__(self, path):
            self.path = os.fsencode(path)

        def __fspath__(self):
            return self.path

    class Broken:
        def __fspath__(self):
            raise RuntimeError("boom")

    as_bytes = [os.fsencode(d) for d in dirs]
    out = tiesmerge.merge(BytesPath(dirs[0]), [as_bytes[1], BytesPath(dirs[2])], "ties",
                          output=BytesPath(tmp_path / "o1"))
    assert (Path(out) / "model.safetensors").is_file()
    expected = tiesmerge.merge(dirs[0], dirs[1:], "ties")
    merged = tiesmerge.merge(as_bytes[0], as_bytes[1:], "ties")
    assert all(torch.equal(expected[k], merged[k]) for k in expected)
    assert tiesmerge.plan_merge(dirs[0], [as_bytes[1], as_bytes[2]], "ties").jobs
    assert tiesmerge.open_checkpoint(as_bytes[0]).names() == tiesmerge.open_checkpoint(BytesPath(dirs[0])).names()
    tiesmerge.analyze(dirs[0], dirs[1:], output=os.fsencode(tmp_path / "report"))
    assert (tmp_path / "report" / "analysis.json").is_file()
    with pytest.raises(ConfigError, match="its __fspath__ raised RuntimeError: boom"):
        tiesmerge.merge(Broken(), dirs[1:], "ties")


def test_a_long_prompt_is_cut_before_it_is_tokenized_and_scores_the_same():
    """hp37b AD3: adapt's choice forward (and rank classification) tokenized a whole prompt line before keeping its
    last tokens: one 6 MB line took 40 s and 2.1 GB. The text is now cut to what the kept tokens can cover first;
    the scores are those of the whole text."""
    pytest.importorskip("tokenizers")
    from test_evaluation_forward import _tiny_causal
    from tiesmerge.evaluation.forward import ChoiceLogits, logits
    from tiesmerge.evaluation.rank_classification import ChoiceExample, score_choices

    model, tok = _tiny_causal()
    seen: list[int] = []
    real_call = type(tok).__call__

    def spy(self, text, *args, **kwargs):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return real_call(self, text, *args, **kwargs)

    long_text = " ".join(["the cat sat"] * 20_000)  # 240,000 characters, far past 48 tokens' worth
    fwd = ChoiceLogits(model, tok, choices={"qa": ("yes", "no")}, max_length=48)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(tok), "__call__", spy)
        with torch.no_grad():
            out = logits(fwd, fwd.encode([{"text": long_text}], "qa"), "qa")
        ranked = score_choices(model, tok, [ChoiceExample(long_text, ("yes", "no"), 0)], max_length=48)
    assert max(seen) <= 48 * 100, max(seen)
    tail = " ".join(["the cat sat"] * 40)  # the whole text's last 47 tokens lie in its last 120 words
    with torch.no_grad():
        expected = logits(fwd, fwd.encode([{"text": tail}], "qa"), "qa")
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.tensor(ranked[0]), out[0].double().float(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("method,said", [("ties", True), ("breadcrumbs_ties", True), ("task_arithmetic", False)])
def test_a_union_recipe_of_a_trimming_method_says_where_it_differs_from_mergekit(tmp_path, method, said):
    """hp37b V03: with tokenizer_source: union and a magnitude trim, rows of the base's own tokens differed from
    mergekit's (it ranks them together with the new tokens' rows) without a word; the translation's warning says so."""
    from tiesmerge.recipe_mergekit import translate_mergekit

    density = "" if method == "task_arithmetic" else ", density: 0.5"
    data = {"merge_method": method, "base_model": str(tmp_path / "b"), "tokenizer_source": "union",
            "models": [{"model": str(tmp_path / m), "parameters": {"weight": 0.5, **({"density": 0.5} if density
                                                                                     else {})}} for m in "xy"]}
    _, origin = translate_mergekit(data, source="r.yaml")
    warning = next(w for w in origin["warnings"] if w.startswith("tokenizer_source: union"))
    assert ("some old-token rows can differ from mergekit's" in warning) == said, warning


@pytest.mark.parametrize("who", ["model", "base"])
def test_a_shard_tensor_the_index_omits_and_no_other_input_has_is_refused(tmp_path, capsys, who):
    """hp37b I02: a shard holding a tensor its index does not list (and the base lacks) merged silently without it,
    though transformers loads every tensor of a shard (and the state-dict API refuses the same extra key)."""
    import json

    from safetensors.torch import load_file, save_file

    from helpers_ckpt import make_family, run_cli

    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base, shards=2)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft, shards=2) for k, ft in enumerate(fts)]
    target = b if who == "base" else ms[1]
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shard = target / sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(shard))
    tensors["extra.unindexed"] = torch.ones(3)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    rc, _, err = run_cli(["merge", "--base", b, "--model", ms[0], "--model", ms[1], "-o", tmp_path / "out"], capsys)
    assert rc == 1 and "does not list 1 tensor(s)" in err and "'extra.unindexed'" in err, err
    assert not (tmp_path / "out").exists()


def test_flags_that_replace_a_recipes_inputs_say_so(tmp_path, capsys):
    """hp37b R02: `merge recipe.yaml --model X --model Y` dropped the recipe's models and their per-model weights
    without a word (the manifest had no weights), and --base replaced the recipe's base silently."""
    from helpers_ckpt import make_family, run_cli

    base, fts = make_family(3)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b", "c"), (base, *fts))]
    (tmp_path / "r.yaml").write_text(f"method: ties\nbase: {dirs[0]}\nmodels:\n  - {{path: {dirs[1]}, weight: 0.1}}\n"
                                     f"  - {{path: {dirs[2]}, weight: 3.0}}\n")
    rc, _, err = run_cli(["merge", tmp_path / "r.yaml", "--model", dirs[2], "--model", dirs[3], "--dry-run"], capsys)
    assert rc == 0 and "--model replaces the recipe's 2 model(s) and their per-model weight" in err, err
    rc, _, err = run_cli(["merge", tmp_path / "r.yaml", "--base", dirs[1], "--model", dirs[2], "--model", dirs[3],
                          "--dry-run"], capsys)
    assert f"--base {dirs[1]} replaces the recipe's base {dirs[0]}" in err, err


@pytest.mark.parametrize("origin", ["7", '"x"', "[1]", "{warnings: 5}"])
def test_a_recipe_origin_of_the_wrong_type_is_no_crash(tmp_path, capsys, origin):
    """hp37 C53: `origin: 7` (or "x", [1], {warnings: 5}) in a recipe made merge fail with "unexpected
    AttributeError ... a bug in tiesmerge": its translation warnings were read before the recipe was checked."""
    from helpers_ckpt import make_family, run_cli

    base, fts = make_family(2)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *fts))]
    (tmp_path / "r.yaml").write_text(f"method: ties\nbase: {dirs[0]}\nmodels: [{dirs[1]}, {dirs[2]}]\n"
                                     f"origin: {origin}\n")
    rc, _, err = run_cli(["merge", tmp_path / "r.yaml", "-o", tmp_path / "o"], capsys)
    assert "unexpected" not in err and "a bug" not in err, err
    assert rc == (0 if origin.startswith("{") else 2), err


def test_a_cards_recipe_pins_the_hub_snapshots_it_merged(hub, tmp_path, capsys):  # noqa: F811
    """hp37 C70: inputs named by Hugging Face repo id were written into the card's recipe as bare ids: after the cache's
    main moved on, re-running the card's recipe silently merged other weights. The recipe names each commit."""
    import yaml
    from safetensors.torch import load_file

    from helpers_ckpt import run_cli

    commits = hub["commits"]
    out = tiesmerge.merge("org/base", ["org/ft-0", "org/ft-1"], "ties", output=tmp_path / "out")
    card = (out / "README.md").read_text()
    recipe = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe["base"] == f"org/base@{commits['base']['main']}"
    assert recipe["models"][1] == f"org/ft-1@{commits['ft1']['main']}"
    # main of org/ft-1 moves to the v1 snapshot: the card's recipe still merges the first one
    refs = hub["cache"] / "models--org--ft-1" / "refs"
    (refs / "main").write_text(commits["ft1"]["v1"])
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(recipe))
    rc, _, err = run_cli(["merge", tmp_path / "again.yaml", "-o", tmp_path / "again"], capsys)
    assert rc == 0, err
    first, second = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_search_resumed_after_its_sign_from_reference_changed_is_refused(tmp_path):
    """hp37 C74: `search --set sign_from=REF` resumed after REF's weights were replaced at the same path: the log
    mixed scores merged with two references and named a wrong best. The reference's files are in the log's stamp."""
    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, fts = make_family(3)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b", "ref"), (base, *fts))]
    log = str(tmp_path / "log.jsonl")

    def run():
        return run_search(dirs[0], dirs[1:3], "ties", lambda state: 1.0, grid={"density": (0.5,), "lam": (1.0,)},
                          fixed={"sign_from": str(dirs[3])}, log=log)

    run()
    run()  # the same reference: resumes
    write_hf_dir(dirs[3], fts[0])  # another model's weights at the reference's path
    with pytest.raises(ConfigError, match="is the log of another search .*the inputs. files"):
        run()


def test_regmeans_budget_floor_is_one_that_fits():
    """hp37 C110: RegMean's chunks were sized as if its Gram matrices took no memory, which was added to the peak
    after: the floor a too-small budget named moved with the budget (1 KiB -> 263.75 -> 387.75 -> ... -> 504 KiB, six
    refusals). The Grams are set aside before chunks are sized: the first floor named is accepted."""
    from helpers_merge import gram_stats, linear_family
    from tiesmerge.errors import ConfigError
    from tiesmerge.inputs import check_budget

    base, models = linear_family(in_features=48, out_features=96, n_models=2)
    stats = [gram_stats({"layer.weight": torch.eye(48)}) for _ in models]
    plan = tiesmerge.plan_merge(base, models, "regmean", stats=stats, memory_budget=1024)
    with pytest.raises(ConfigError) as caught:
        check_budget(plan)
    floor = int(float(caught.value.hint.split("raise --memory-budget to ")[1].split(" KiB")[0]) * 1024) + 1
    check_budget(tiesmerge.plan_merge(base, models, "regmean", stats=stats, memory_budget=floor))  # accepted


def test_the_layer_heatmap_stays_a_bounded_figure_for_many_tensors():
    """hp37 C48: 4,000 tensors named t.0 .. t.3999 drew a 33,000-pixel-tall layer heatmap (57 s, 3.3 GB for a 350 KB
    model; 20,000 tensors were killed at 4 GB). Layers are pooled into bands and the largest module types kept."""
    import struct

    pytest.importorskip("matplotlib")
    from tiesmerge.analysis import report

    rows = [{"name": f"t.{i}.m{i % 200}", "layer": i, "module": f"t.*.m{i % 200}", "numel": 4,
             "of_parameters": (i % 7) / 10} for i in range(5000)]
    png = report._plot_layers(report._pyplot(), {"by_tensor": rows, "n_models": 2})
    width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR
    assert width < 4000 and height < 4000, (width, height)


def test_a_grid_of_a_per_model_option_says_how_to_search_it():
    """hp37 C92: `--grid weights=0.5` said "ties has no numeric option 'weights' to sweep (it has: density, lam)",
    though weights is an option of ties and an axis search takes (--axis weights --range weights=LO:HI)."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.search import parse_grid

    with pytest.raises(ConfigError, match=r"weights is per model .* --axis weights --range weights=LO:HI") as caught:
        parse_grid("ties", ["weights=0.5"])
    assert "has no numeric option" not in str(caught.value)


def test_a_merged_adapter_that_cannot_hold_the_merge_says_so():
    """hp37 C78: two rank-4 LoRAs written as a merged adapter at the default rank 4 lost 53% of a module (the sum of two
    rank-4 changes has rank 8), said only in an info line; a relative error past 0.1 is a warning naming --rank."""
    import warnings

    from helpers_adapters import random_lora, write_lora_dir
    from tiesmerge.errors import MergeWarning

    base = make_base(0)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        b = write_hf_dir(root / "base", base)
        adapters = [write_lora_dir(root / f"a{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
        with pytest.warns(MergeWarning, match=r"at rank 2 holds the merge of .* pass a larger --rank"):
            tiesmerge.merge(b, adapters, "task_arithmetic", lam=1.0, output=root / "o2", output_format="adapter")
        with warnings.catch_warnings():
            warnings.simplefilter("error", MergeWarning)  # rank 4 = 2 + 2 holds the sum exactly: no warning
            tiesmerge.merge(b, adapters, "task_arithmetic", lam=1.0, output=root / "o4", output_format="adapter",
                            rank=4)


def test_a_stopped_demo_removes_only_what_it_wrote(tmp_path, capsys, monkeypatch):
    """hp38 C20: a demo stopped in an empty --workdir emptied it of a file and a folder the user wrote there while
    the demo ran. Only the demo's own files go (its marker, base/ and ft-*/ model files, merged-*/ outputs)."""
    from helpers_ckpt import run_cli
    from tiesmerge.cli import demo

    wd = tmp_path / "wd"
    wd.mkdir()
    real = demo.make_demo_models

    def then_stopped(root, million_params, seed=0):
        real(root, million_params, seed)
        (Path(root) / "user.txt").write_text("mine")  # written by the user while the demo ran
        (Path(root) / "mydir").mkdir()
        (Path(root) / "mydir" / "f").write_text("mine too")
        (Path(root) / "base" / "notes.md").write_text("a note in the demo's folder")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "make_demo_models", then_stopped)
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)
    assert rc == 130, err
    left = sorted(str(p.relative_to(wd)) for p in wd.rglob("*"))
    assert left == ["base", "base/notes.md", "mydir", "mydir/f", "user.txt"], left


def test_a_search_resumed_after_a_tokenizer_file_changed_is_refused(tmp_path):
    """hp38 C10: the log's stamp covered weights and JSON files only: after vocab.txt was permuted in the models (a
    built-in evaluator tokenizes with it), the same search reused every old score."""
    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, fts = make_family(2)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *fts))]
    for d in dirs:
        (d / "vocab.txt").write_text("[PAD]\n[UNK]\ncat\ndog\n")
    log = str(tmp_path / "log.jsonl")

    def run():
        return run_search(dirs[0], dirs[1:], "ties", lambda state: 1.0, grid={"density": (0.5,), "lam": (1.0,)},
                          log=log)

    run()
    run()  # nothing changed: resumes
    (dirs[0] / "vocab.txt").write_text("[PAD]\n[UNK]\ndog\ncat\n")
    with pytest.raises(ConfigError, match="is the log of another search .*the inputs. files"):
        run()


def test_adapts_resume_fingerprint_covers_the_inputs_files(tmp_path):
    """hp38 C8, C9: `adapt --resume` went on from a checkpoint after a model's weights were replaced at the same path,
    or the base's tokenizer permuted: the fingerprint held the models' paths only."""
    from helpers_ckpt import make_family
    from tiesmerge.adamerging.learn import AdaptConfig
    from tiesmerge.adamerging.run import _fingerprint

    base, fts = make_family(2)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *fts))]
    (dirs[0] / "vocab.txt").write_text("[PAD]\ncat\ndog\n")

    def fingerprint():
        return _fingerprint(dirs[0], dirs[1:], "task_arithmetic", AdaptConfig(), {"t": [{"text": "x"}]}, "classifier")

    first = fingerprint()
    assert fingerprint() == first
    write_hf_dir(dirs[2], fts[0])  # other weights at the same path
    second = fingerprint()
    assert second != first
    (dirs[0] / "vocab.txt").write_text("[PAD]\ndog\ncat\n")
    assert fingerprint() != second


def test_a_packaged_evaluators_project_modules_are_in_the_digest(tmp_path, monkeypatch):
    """hp38 C24: an evaluator pkg.ev importing `common` from beside pkg/ resumed after common.py was edited: only
    modules below pkg/ counted. The folder it was imported from (sys.path's entry) counts."""
    import importlib
    import sys

    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "c24pkg").mkdir()
    (tmp_path / "c24pkg" / "__init__.py").write_text("")
    (tmp_path / "c24common.py").write_text("SCALE = 1.0\n")
    (tmp_path / "c24pkg" / "ev.py").write_text("import c24common\n\n\ndef score(state):\n    return c24common.SCALE\n")
    base, models = make_family(2)
    ev = importlib.import_module("c24pkg.ev")
    grid, log = {"density": (0.5,), "lam": (1.0,)}, str(tmp_path / "log.jsonl")
    run_search(base, models, "ties", ev.score, grid=grid, log=log)
    (tmp_path / "c24common.py").write_text("SCALE = -1.0\n")
    importlib.reload(sys.modules["c24common"])
    with pytest.raises(ConfigError, match="is the log of another search .*the evaluator.s code"):
        run_search(base, models, "ties", ev.score, grid=grid, log=log)


def test_the_analysis_report_shows_undecodable_path_bytes_as_x_escapes():
    """hp38 C17: report.html showed caf\\udce9 for a folder named with the byte e9 (messages and the card say
    caf\\xe9)."""
    from tiesmerge.analysis.report import _displayable

    assert _displayable({"inputs": {"models": ["caf\udce9/ft"]}}) == {"inputs": {"models": ["caf\\xe9/ft"]}}


def test_two_spellings_of_one_model_in_a_mergekit_linear_recipe_are_both_named(tmp_path, capsys):
    """hp38 C23: a linear recipe listing a folder and a link to it was refused as "listed twice; mergekit refuses
    duplicate merge inputs too" (false: mergekit compares the strings and merges both), naming one spelling only."""
    from helpers_ckpt import make_family, run_cli

    base, fts = make_family(2)
    a, b = write_hf_dir(tmp_path / "ftA", fts[0]), write_hf_dir(tmp_path / "ftB", fts[1])
    os.symlink(a, tmp_path / "ftA_link")
    (tmp_path / "r.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
                                     f"  - model: {tmp_path / 'ftA_link'}\n    parameters: {{weight: 1}}\n"
                                     f"  - model: {b}\n    parameters: {{weight: 1}}\n")
    rc, _, err = run_cli(["merge", tmp_path / "r.yaml", "-o", tmp_path / "o"], capsys)
    assert rc == 2 and "are one model (one weights file under two names" in err and "ftA_link" in err, err
    assert "mergekit refuses" not in err


def test_another_commands_output_is_not_offered_to_force(tmp_path, capsys):
    """hp38 C50: `analyze -o <a merged model>` said "pass --force (force=True) to replace it", and --force then
    refused: it replaces only an earlier output of the same command."""
    pytest.importorskip("matplotlib")
    from helpers_ckpt import make_family, run_cli

    base, fts = make_family(2)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *fts))]
    merged = tiesmerge.merge(dirs[0], dirs[1:], "ties", output=tmp_path / "merged")
    rc, _, err = run_cli(["analyze", "--base", dirs[0], "--model", dirs[1], "--model", dirs[2], "-o", merged,
                          "--no-progress"], capsys)
    assert rc != 0 and "holds another command's output" in err and "pass --force" not in err, err


def test_a_cut_choice_is_said_to_be_at_least_its_counted_tokens():
    """hp38 C42: a 1,000,000-token answer choice was said to be "2,134 tokens": it is counted after the cut that spares
    tokenizing all of it, so the count is a lower bound and says so."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.rank_classification import fit_choice

    long = "word " * 200_000
    with pytest.raises(ConfigError, match=r"is at least 2,000 tokens"):
        fit_choice([1], list(range(2000)), 16, long)
    with pytest.raises(ConfigError, match=r"is 20 tokens"):
        fit_choice([1], list(range(20)), 16, "short " * 20)


def test_an_adapters_reconstruction_error_is_that_of_the_factors_written(tmp_path):
    """hp38 C29: a merged LoRA adapter written in float16 reported the error of its float32 factors (4e-8), while the
    float16 factors written are 3e-4 off. The error now includes their rounding."""
    import json

    from safetensors.torch import load_file

    from helpers_adapters import random_lora, write_lora_dir

    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    adapters = [write_lora_dir(tmp_path / f"a{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    full = tiesmerge.merge(b, adapters, "task_arithmetic", lam=1.0)  # the merge, as a full model (float32)
    errors = {}
    for dtype in ("float32", "float16"):
        out = tiesmerge.merge(b, adapters, "task_arithmetic", lam=1.0, output=tmp_path / dtype,
                              output_format="adapter", rank=4, dtype=dtype)
        manifest = json.loads((out / "tiesmerge.json").read_text())
        errors[dtype] = manifest["adapters"]["max_relative_reconstruction_error"]
        factors = load_file(str(out / "adapter_model.safetensors"))
        worst = 0.0
        for key in (k for k in factors if k.endswith(".lora_A.weight")):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            tau = full[module + ".weight"].double() - base[module + ".weight"].double()
            written = factors[key.replace("lora_A", "lora_B")].double() @ factors[key].double()
            worst = max(worst, float((tau - written).norm() / tau.norm()))
        assert worst <= errors[dtype] * 1.01 + 1e-6, (dtype, worst, errors[dtype])  # the number bounds the file
    assert errors["float32"] < 1e-5 < errors["float16"]


def test_the_dry_run_of_an_adapter_output_says_what_an_adapter_holds(tmp_path):
    """hp37b P09: the dry run of `--output-format adapter` said "19 copied from the base" and a full model's output
    size (71 MiB, where a 3.3 MB adapter was written)."""
    from helpers_adapters import random_lora, write_lora_dir

    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    adapters = [write_lora_dir(tmp_path / f"a{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    text = tiesmerge.describe_plan(tiesmerge.plan_merge(b, adapters, "ties", output_format="adapter"), "ties", 2)
    assert "nothing copied (an adapter" in text and "copied from the base" not in text, text
    # the adapter's own size, a number (hp40b C52: a rank formula was printed): 4 modules, rank 2, float32
    assert "output size      640 B (rank-2 LoRA factors of 4 adapted module(s)" in text, text
    full = tiesmerge.describe_plan(tiesmerge.plan_merge(b, adapters, "ties"), "ties", 2)
    assert "copied from the base" in full


def test_a_non_finite_objective_at_step_0_names_the_start_not_the_learning_rate(recwarn):
    """hp38 C74: a NaN entropy at step 0 printed torch's own UserWarning (float() of a tensor that requires grad) and
    hinted "lower --lr, or --clamp", though no step had been taken."""
    import warnings

    from test_adapt import _data, _encode, _family, _net
    from tiesmerge.errors import TrainingError
    from tiesmerge.evaluation.forward import FunctionLogits

    base, fts = _family()
    nan = FunctionLogits(_net(), lambda m, b, task: m(b) * float("nan"), encode=_encode)
    warnings.simplefilter("always")
    with pytest.raises(TrainingError, match="at step 0 is nan") as caught:
        tiesmerge.adapt(base, fts, _data(), forward=nan, tasks=["a", "b"], steps=3)
    assert "no step was taken yet" in caught.value.hint and "--lr" not in caught.value.hint
    assert not [w for w in recwarn if "requires_grad" in str(w.message) or "grad" in str(w.message).lower()]


def test_statistics_of_another_tokenizer_are_refused(classifiers, tmp_path, capsys):
    """hp38 C38: statistics record the model's weights only: Gram matrices computed while the tokenizer was another
    (vocab permuted, then restored; or the reverse) merged silently. They record the tokenizer files' digest too."""
    import shutil

    from tiesmerge.cli.main import main

    root, base, shared, data = classifiers
    fts = [Path(shutil.copytree(ft, tmp_path / f"ft{k}")) for k, ft in enumerate(shared)]  # the fixture is shared
    for k, ft in enumerate(fts):
        assert main(["stats", "gram", "--model", str(ft), "--data", str(data), "--batch-size", "2",
                     "-o", str(tmp_path / f"gram{k}")]) == 0
    capsys.readouterr()
    argv = ["merge", "--method", "regmean", "--base", str(base)]
    for k, ft in enumerate(fts):
        argv += ["--model", str(ft), "--stats", str(tmp_path / f"gram{k}")]
    assert main([*argv, "-o", str(tmp_path / "ok")]) == 0, capsys.readouterr().err
    tokenizer = next(p for p in sorted(fts[1].iterdir()) if p.name in ("tokenizer.json", "vocab.txt"))
    tokenizer.write_text(tokenizer.read_text() + "\n")  # another tokenizer file, the same weights
    assert main([*argv, "-o", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err
    assert "computed with the same weights as model 1" in err and "another tokenizer" in err, err


def test_a_demo_rerun_stopped_midway_leaves_no_merges_of_other_models(tmp_path, capsys, monkeypatch):
    """hp38 C21: a finished demo rerun with another --params and stopped while writing its models left the new models
    beside the old merges of other models: a folder that looks complete but mixes two demos."""
    from helpers_ckpt import run_cli
    from tiesmerge.cli import demo

    wd = tmp_path / "wd"
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)
    assert rc == 0 and (wd / "merged-ties").is_dir(), err

    def stopped(root, million_params, seed=0):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "make_demo_models", stopped)
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.06", "--workdir", str(wd)], capsys)
    assert rc == 130, err
    assert not any(p.name.startswith("merged-") for p in wd.iterdir()), sorted(p.name for p in wd.iterdir())


def test_a_merge_that_read_pickled_weights_says_so_in_its_card_and_manifest(tmp_path, capsys):
    """hp38 C12: a merge run with --allow-pickle on a .bin model recorded it nowhere: the card's recipe re-ran into
    "pass --allow-pickle" without having said why, and tiesmerge.json did not mention it."""
    import json

    import yaml

    from helpers_ckpt import make_family, run_cli, write_pickle

    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    legacy = tmp_path / "legacy"
    write_pickle(legacy / "pytorch_model.bin", fts[0])
    ft1 = write_hf_dir(tmp_path / "ft1", fts[1])
    out = tiesmerge.merge(b, [legacy, ft1], "ties", output=tmp_path / "out", allow_pickle=True)
    card = (out / "README.md").read_text()
    recipe = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe["allow_pickle"] is True
    assert json.loads((out / "tiesmerge.json").read_text())["recipe"]["allow_pickle"] is True
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    rc, _, err = run_cli(["merge", tmp_path / "r.yaml", "-o", tmp_path / "again"], capsys)
    assert rc == 2 and "the recipe sets allow_pickle: true" in err, err
    safe = tiesmerge.merge(b, [write_hf_dir(tmp_path / "ft0", fts[0]), ft1], "ties", output=tmp_path / "safe",
                           allow_pickle=True)  # nothing pickled was read: nothing to say
    assert "allow_pickle" not in json.loads((safe / "tiesmerge.json").read_text())["recipe"]


def test_the_resume_stamp_covers_subfolder_shards_pth_files_and_state_dicts(tmp_path):
    """hp39 C3, C4, C25: a shard in a subfolder (index -> shards/...) was not stamped; C5: nor a .pth file; C6, C18:
    state dicts given in memory counted by their position only: resumes reused old scores and coefficients."""
    import json

    from safetensors.torch import save_file

    from helpers_ckpt import make_family, write_pickle
    from tiesmerge.tuning.driver import weights_stamp

    base, fts = make_family(2)
    sub = tmp_path / "sub"
    (sub / "shards").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in fts[0].items()}, str(sub / "shards" / "model-00001-of-00001.safetensors"))
    (sub / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "shards/model-00001-of-00001.safetensors" for k in fts[0]}}))
    (sub / "config.json").write_text("{}")
    pth = tmp_path / "pth"
    write_pickle(pth / "weights.pth", fts[1])
    before = weights_stamp([sub, pth, dict(base)])
    assert weights_stamp([sub, pth, dict(base)]) == before
    shard = sub / "shards" / "model-00001-of-00001.safetensors"
    save_file({k: (v * 2).contiguous() for k, v in fts[0].items()}, str(shard))
    after_shard = weights_stamp([sub, pth, dict(base)])
    assert after_shard != before
    write_pickle(pth / "weights.pth", fts[0])
    after_pth = weights_stamp([sub, pth, dict(base)])
    assert after_pth != after_shard
    assert weights_stamp([sub, pth, {k: v + 1 for k, v in base.items()}]) != after_pth


def test_adapts_resume_fingerprint_covers_a_sign_from_model(tmp_path):
    """hp39 C1: `adapt --resume` with a --sign-from model whose weights were replaced resumed with 0 steps, the
    coefficients of the old sign vector."""
    from test_adapt import _data, _family, _forward
    from tiesmerge.errors import ConfigError

    base, fts = _family(3)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b", "ref"), (base, *fts))]
    kwargs = dict(forward=_forward(), steps=2, checkpoint=tmp_path / "ck.pt", sign_from=str(dirs[3]))
    tiesmerge.adapt(dirs[0], dirs[1:3], _data(), "ties", **kwargs)
    tiesmerge.adapt(dirs[0], dirs[1:3], _data(), "ties", resume=True, **{**kwargs, "steps": 3})  # the same: resumes
    write_hf_dir(dirs[3], fts[0])  # another reference at the same path
    with pytest.raises(ConfigError, match="this checkpoint is of another run"):
        tiesmerge.adapt(dirs[0], dirs[1:3], _data(), "ties", resume=True, **{**kwargs, "steps": 4})


def test_a_huge_lam_adapters_reported_error_is_finite(tmp_path):
    """hp39 C29: a LoRA adapter merged with lam 1e36 into bfloat16 reported "relative reconstruction error at most inf"
    (its float32 product overflowed in the norm) and wrote Infinity into tiesmerge.json."""
    import json
    import math

    from helpers_adapters import random_lora, write_lora_dir

    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    adapters = [write_lora_dir(tmp_path / f"a{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    with pytest.warns(Warning):
        out = tiesmerge.merge(b, adapters, "task_arithmetic", lam=1e36, output=tmp_path / "o", output_format="adapter",
                              rank=2, dtype="bfloat16")
    text = (out / "tiesmerge.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert math.isfinite(json.loads(text)["adapters"]["max_relative_reconstruction_error"])


def test_lm_perplexity_respects_the_models_positions_and_a_diverging_candidate(tmp_path):
    """hp39 C38: lm-perplexity scored 256-token windows on a model of 16 positions (an IndexError blamed on the
    evaluator); C45: a diverging candidate's perplexity overflowed math.exp and ended the search."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import math

    from test_evaluation_rank_classification import LM_VOCAB, _wordlevel_tokenizer
    from tiesmerge.evaluation.builtin import LMPerplexity

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=LM_VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                  tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "lm")
    _wordlevel_tokenizer("$A", ("<s>", 2)).save_pretrained(tmp_path / "lm")
    (tmp_path / "t.txt").write_text(" ".join(["the cat sat"] * 40))
    score = LMPerplexity(tmp_path / "lm", tmp_path / "t.txt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert math.isfinite(score(state))
    diverging = {k: (v * 1e4 if k.endswith("lm_head.weight") or "wte" in k else v) for k, v in state.items()}
    worst = score(diverging)
    assert math.isfinite(worst) and worst < -1e200


def test_debertas_spm_model_is_a_tokenizer_file(tmp_path):
    """hp39 C44: DeBERTa-v2/v3 keep their vocabulary in spm.model, which was neither stamped for a resume nor copied
    into a merged model's folder."""
    from helpers_ckpt import make_family
    from tiesmerge.tuning.driver import weights_stamp

    base, fts = make_family(2)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *fts))]
    (dirs[0] / "spm.model").write_bytes(b"\x00sentencepiece")
    before = weights_stamp(dirs)
    (dirs[0] / "spm.model").write_bytes(b"\x00sentencepiecf")
    assert weights_stamp(dirs) != before
    out = tiesmerge.merge(dirs[0], dirs[1:], "ties", output=tmp_path / "out")
    assert (out / "spm.model").read_bytes() == b"\x00sentencepiecf"


def test_an_adapter_outputs_summary_says_nothing_was_copied(tmp_path, capsys):
    """hp39 C16: a merged LoRA adapter's summary line said "37 copied" (a full model's count), the dry run nothing."""
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import run_cli

    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    adapters = [write_lora_dir(tmp_path / f"a{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    argv = ["merge", "--base", b, "--model", adapters[0], "--model", adapters[1], "--method", "task_arithmetic"]
    rc, out, err = run_cli([*argv, "--output-format", "adapter", "--rank", "4", "-o", tmp_path / "ad"], capsys)
    assert rc == 0 and "tensors merged, nothing copied (an adapter)" in out, out + err
    rc, out, err = run_cli([*argv, "-o", tmp_path / "full"], capsys)  # a full model of the same adapters: copies
    assert rc == 0 and "nothing copied" not in out and " copied, " in out, out + err
