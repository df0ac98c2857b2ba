"""Issue 13, the sixth independent hostile pass: one case per finding, checked as the catalogue checks its cases
(exit status, message, no traceback, nothing left, inputs unchanged).

- h2/h3/h21: ``-o LINK/../NAME`` was checked where the kernel resolves it but written where ``abspath`` puts it: an
  earlier output used as an input was replaced. Every write now goes where the kernel resolves the path.
- s3a, f8: statistics holding Inf and float8 outputs clipped at their largest value were written silently.
- x5: any tensor with extra rows was called a vocabulary (and ``--vocab-policy truncate`` cut an MLP weight).
- y9, cf3: integers past the float range and configs transformers cannot run were "bugs in tiesmerge".
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import test_hostile_catalogue
from helpers_ckpt import make_family, run_cli, write_hf_dir
from test_hostile_catalogue import _merge, check, snapshot

family = test_hostile_catalogue.family


def test_an_output_after_a_link_and_dotdot_is_written_where_the_kernel_resolves_it(family, tmp_path, capsys,
                                                                                  monkeypatch):
    inputs, b, ms = family
    earlier = tmp_path / "work" / "out0"
    rc, _, err = run_cli(_merge(b, ms, earlier), capsys)
    assert rc == 0, err
    elsewhere = tmp_path / "elsewhere" / "sub"
    elsewhere.mkdir(parents=True)
    (tmp_path / "work" / "l").symlink_to(elsewhere)  # l/.. is tmp_path/elsewhere to the kernel, ./ to abspath
    before, kept = snapshot(inputs), snapshot(earlier)
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", "out0", "-o", "l/../out0",
                          "--force", "--no-progress"], capsys)
    assert rc == 0 and "Traceback" not in err, err
    assert snapshot(earlier) == kept  # the input named out0 is untouched
    assert (tmp_path / "elsewhere" / "out0" / "tiesmerge.json").is_file()  # where `ls l/../out0` finds it
    assert snapshot(inputs) == before


def test_physical_keeps_the_last_name_and_resolves_the_folder(tmp_path):
    from tiesmerge.paths import physical

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "l").symlink_to(tmp_path / "a" / "b")
    (tmp_path / "last").symlink_to(tmp_path / "a")
    assert physical(tmp_path / "l" / ".." / "x") == tmp_path / "a" / "x"
    assert physical(tmp_path / "last") == tmp_path / "last"  # a link at the output is seen, not followed
    assert physical(str(tmp_path / "a" / "b") + "/..") == tmp_path / "a"
    assert physical(str(tmp_path / "a") + "/") == tmp_path / "a"


@pytest.mark.parametrize("text,needles", [("foo: 1\n", ("unknown key 'foo'", "'base' is missing")),
                                          ("method: ties\n", ("'base' is missing", "'models' must be"))])
def test_a_recipe_without_base_or_models_lists_its_own_problems(tmp_path, capsys, monkeypatch, text, needles):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(text)
    rc, _, err = run_cli(["merge", "r.yaml", "-o", "out"], capsys)
    assert rc == 2 and all(n in err for n in needles) and "(or a recipe file)" not in err, err


def test_statistics_that_overflow_are_refused_before_anything_is_written(tmp_path):
    from tiesmerge.errors import InvalidTensorError
    from tiesmerge.stats import Statistics, StatsManifest
    from tiesmerge.stats.files import save_stats

    manifest = StatsManifest(kind="gram", model="m", model_digest="tensors:0", examples=1)
    stats = Statistics(manifest, {"w": torch.tensor([[1.0, float("inf")], [0.0, 1.0]])})
    with pytest.raises(InvalidTensorError) as info:
        save_stats(tmp_path / "st", stats)
    assert "gram statistic 'w' (2, 2): 1 entries are not finite" in str(info.value)
    assert not (tmp_path / "st").exists() and list(tmp_path.iterdir()) == []


def test_float8_outputs_past_their_range_are_refused_not_clipped(tmp_path, capsys):
    from safetensors.torch import save_file

    inputs = tmp_path / "inputs"
    names = []
    for k, bump in enumerate((0.0, 400.0, 400.0)):
        state = {"w": torch.zeros(4, 4), "v": torch.ones(4)}
        state["w"][0, 0] = bump
        folder = inputs / f"m{k}"
        folder.mkdir(parents=True)
        save_file({n: t.to(torch.float8_e4m3fn) for n, t in state.items()}, str(folder / "model.safetensors"))
        names.append(folder)
    before = snapshot(inputs)
    rc, _, err = run_cli(["merge", "--base", str(names[0]), "--model", str(names[1]), "--model", str(names[2]),
                          "--method", "task_arithmetic", "--lam", "1", "-o", str(tmp_path / "out"), "--no-progress"],
                         capsys)
    check(rc, err, want_rc=1, needle=("tensor 'w'", "is 768", "largest value 448", "--dtype bfloat16"),
          output=tmp_path / "out", inputs=inputs, before=before)


def test_only_a_vocabulary_tensor_may_differ_in_rows(family, tmp_path, capsys):
    inputs, b, ms = family
    from safetensors.torch import load_file, save_file

    state = load_file(str(ms[1] / "model.safetensors"))
    name = next(n for n, t in state.items()
                if t.dim() == 2 and t.is_floating_point() and "embed" not in n and "lm_head" not in n)
    state[name] = torch.cat([state[name], state[name][:1]])  # one more row: another architecture
    save_file(state, str(ms[1] / "model.safetensors"))
    before = snapshot(inputs)
    for extra in ((), ("--vocab-policy", "truncate")):
        rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", *extra), capsys)
        check(rc, err, want_rc=1, needle=(name, "all models must share the base's architecture"),
              output=tmp_path / "out", inputs=inputs, before=before)
        assert "vocabulary sizes differ" not in err


def test_candidate_keys_are_computed_once():
    from tiesmerge.tuning.candidates import Candidate

    c = Candidate(0, {"density": 0.2, "lam": 1.0})
    assert c.key is c.key  # cached: a batch of 20,000 is de-duplicated through a dict, not pairwise


def test_a_bad_mplbackend_in_the_environment_does_not_stop_the_plots(monkeypatch):
    import subprocess
    import sys

    env = {**os.environ, "MPLBACKEND": "nonexistent_backend"}
    done = subprocess.run([sys.executable, "-c", "from tiesmerge.plotting import pyplot; import os; pyplot('x'); "
                           "import matplotlib; print(matplotlib.get_backend(), os.environ['MPLBACKEND'])"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.lower().split() == ["agg", "nonexistent_backend"], done.stderr


def test_integers_past_the_float_range_are_typed_errors(family, tmp_path, capsys, monkeypatch):
    import tiesmerge
    from tiesmerge.errors import ConfigError

    inputs, b, ms = family
    big = "1" + "0" * 400
    for text in (f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\nparameters: {{lam: {big}}}\n",
                 f"merge_method: linear\nmodels: [{{model: {ms[0]}, parameters: {{weight: {big}}}}}, "
                 f"{{model: {ms[1]}, parameters: {{weight: 1}}}}]\n",
                 f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\nshard_size: {big}\n"):
        (tmp_path / "r.yaml").write_text(text)
        for argv in (["validate", str(tmp_path / "r.yaml")], ["merge", str(tmp_path / "r.yaml"), "-o", "out"]):
            rc, _, err = run_cli(argv, capsys)
            assert rc != 0 and "an integer of 401 digits" in err and "bug" not in err, err
    with pytest.raises(ConfigError) as info:
        tiesmerge.merge(b, ms, "ties", lam=10 ** 400)
    assert "an integer of 401 digits" in str(info.value) and len(str(info.value)) < 200


def test_power_iterations_are_bounded():
    from tiesmerge.errors import ConfigError
    from tiesmerge.registry import method_class

    with pytest.raises(ConfigError, match=r"power_iters must be in \[0, 100\]"):
        method_class("tsv_m")(power_iters=10 ** 9)


def test_an_edited_search_report_stops_the_next_run_before_it_is_replaced(tmp_path):
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import SEARCH_STAMPS, check_search_dir, file_stamp

    d = tmp_path / "search"
    d.mkdir()
    (d / "log.jsonl").write_text('{"format": "tiesmerge-search/1"}\n')
    for name in ("results.md", "report.html"):
        (d / name).write_text("as written")
    (d / SEARCH_STAMPS).write_text(json.dumps({n: file_stamp(d / n) for n in ("results.md", "report.html")}))
    check_search_dir(d)  # as the search left it: resumable
    (d / "results.md").write_text("as written, and my notes")
    with pytest.raises(OutputError, match="results.md changed since the search wrote it"):
        check_search_dir(d)
    assert (d / "results.md").read_text() == "as written, and my notes"


def test_a_link_leaving_the_model_under_any_name_is_refused_before_transformers(tmp_path):
    from tiesmerge.errors import CheckpointError
    from tiesmerge.paths import check_model_dir

    base, _ = make_family(1)
    m = write_hf_dir(tmp_path / "m", base)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (m / "normalizer.json").symlink_to(secret)  # Whisper's tokenizer opens it; no fixed list names it
    with pytest.raises(CheckpointError, match="resolves to .*outside"):
        check_model_dir(m, "the model")
    (m / "normalizer.json").unlink()
    os.mkfifo(m / "entity_vocab.json")
    with pytest.raises(CheckpointError, match="FIFO"):
        check_model_dir(m, "the model")
    (m / "entity_vocab.json").unlink()
    (m / "notes.txt").write_text("a regular file inside is fine")
    assert check_model_dir(m, "the model") == m


def test_texts_are_truncated_at_the_models_position_table():
    from types import SimpleNamespace

    from tiesmerge.evaluation.loading import fitted_length

    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert fitted_length(model(max_position_embeddings=32, model_type="bert"), 128) == 32
    assert fitted_length(model(max_position_embeddings=514, model_type="roberta"), 1024) == 512
    assert fitted_length(model(max_position_embeddings=512, model_type="bert"), 128) == 128
    assert fitted_length(model(model_type="t5"), 128) == 128  # no table: as asked


def test_a_model_whose_code_fails_is_a_typed_error_naming_it(tmp_path):
    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation.loading import forward_checked, from_pretrained

    def loader(directory, **kwargs):
        raise ZeroDivisionError("integer modulo by zero")

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"cannot load the model \(ZeroDivisionError"):
        from_pretrained(loader, tmp_path)
    with pytest.raises(CheckpointError, match=r"m: the model fails in its forward pass \(AssertionError: pad"):
        with forward_checked("m"):
            raise AssertionError("pad")


def test_a_local_ray_cluster_gets_a_private_token_and_a_short_folder(tmp_path, monkeypatch):
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import executors

    # a private copy of the environment: a token left in this process's own would be presented to the Ray clusters
    # that later tests start (Ray is imported already), which would refuse them
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path / "home")
    monkeypatch.setattr(os, "environ", env)
    executors._private_token()
    assert env["RAY_AUTH_MODE"] == "token" and len(env["RAY_AUTH_TOKEN"]) == 64
    assert not (tmp_path / "home").exists()  # nothing written to ~/.ray
    env.update(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN="")
    executors._private_token()
    assert env["RAY_AUTH_MODE"] == "disabled"  # the user's choice stands
    long = tmp_path / ("t" * 60)
    long.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(long))
    with pytest.raises(ConfigError, match="RAY_TMPDIR"):
        executors._ray_folder()


@pytest.mark.parametrize("flag", ["--stats", "--model", "-o"])
def test_an_empty_option_value_is_named_not_taken_for_the_working_folder(family, tmp_path, capsys, flag):
    inputs, b, ms = family
    argv = ["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "-o", str(tmp_path / "out")]
    argv += [flag, ""]
    before = snapshot(inputs)
    rc, _, err = run_cli(argv, capsys)
    check(rc, err, want_rc=2, needle=f"error: {flag} is empty", output=tmp_path / "out", inputs=inputs, before=before)


def test_debug_after_the_command_is_accepted(family, tmp_path, capsys):
    inputs, b, ms = family
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", "--debug"), capsys)
    assert rc == 0, err


def test_a_recipe_cannot_consent_to_unpickling_for_the_user(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    (tmp_path / "r.yaml").write_text(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\nallow_pickle: true\n")
    for command in (["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")],
                    ["validate", str(tmp_path / "r.yaml")]):
        rc, _, err = run_cli(command, capsys)
        assert rc == 2 and "only --allow-pickle on the command line" in err, err
    rc, _, err = run_cli(["validate", str(tmp_path / "r.yaml"), "--allow-pickle"], capsys)
    assert rc == 0, err


def test_a_recipe_path_under_an_existing_folder_is_not_taken_for_a_repo_id(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "work" / "rdir").mkdir()
    (tmp_path / "work" / "rdir" / "t.yaml").write_text("method: ties\nbase: base\nmodels: [a, b]\n")
    rc, _, err = run_cli(["merge", "rdir/t.yaml", "-o", str(tmp_path / "out")], capsys)
    assert rc == 1 and "rdir/base: no such file or directory" in err and "hf download" not in err, err


def test_a_quantized_base_under_float_fine_tunes_is_refused(tmp_path):
    import tiesmerge
    from tiesmerge.errors import CheckpointError

    base, fts = make_family(2)
    name = "model.layers.0.self_attn.q_proj.weight"
    base[name] = base[name].to(torch.int8)
    with pytest.raises(CheckpointError, match=f"the base is a quantized checkpoint \\(it stores '{name}' as int8"):
        tiesmerge.merge(base, fts, "ties")


def test_api_output_and_origin_are_checked_before_any_work(family, tmp_path):
    import tiesmerge
    from tiesmerge.errors import ConfigError

    inputs, b, ms = family
    with pytest.raises(ConfigError, match="output is a int, not a path"):  # bytes are a path (hp37b A30)
        tiesmerge.merge(b, ms, "ties", output=123)
    with pytest.raises(ConfigError, match="origin holds a value that cannot be written to the manifest, under its "
                                          "key 'x'"):  # the key named (hp65a c33)
        tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", origin={"x": object()})
    assert not (tmp_path / "out").exists()


class PanicException(BaseException):  # as pyo3 raises a Rust panic (the tokenizers library): not an Exception
    pass


def test_a_tokenizer_panic_is_a_typed_error_not_a_traceback(family, tmp_path, capsys, monkeypatch):
    from tiesmerge.cli import commands as cli
    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation.loading import forward_checked

    with pytest.raises(CheckpointError, match=r"m: the model's tokenizer fails on the text \(PanicException: Onig"):
        with forward_checked("m"):
            raise PanicException("Onig: Regex search error: retry-limit-in-match over")

    def panics(args):
        raise PanicException("Onig: Regex search error")

    monkeypatch.setitem(cli.HANDLERS, "methods", panics)
    rc, _, err = run_cli(["methods"], capsys)
    assert rc == 1 and "error: a library tiesmerge called stopped with PanicException" in err, err
    assert "Traceback" not in err
