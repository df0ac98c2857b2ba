"""Hostile pass 56 and the leftovers of pass 55: messages that name what is wrong."""

from __future__ import annotations

import os

import pytest
import torch

from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import assert_no_output, cli_flags, make_family, run_cli, write_hf_dir


@pytest.mark.parametrize("role", ["model", "base"])
def test_an_adapter_folder_without_its_config_is_named_as_such(tmp_path, capsys, role):
    """hp54a c19 (second form): a PEFT adapter's folder that lost its adapter_config.json, given as a model (or as the
    base), read as a model of other tensor names: "tensor names differ ... all models must be fine-tunes of the same
    base architecture", with nothing about the adapter or its missing config."""
    base, models = make_family(1)
    b = write_hf_dir(tmp_path / "base", base)
    m = write_hf_dir(tmp_path / "m0", models[0])
    lone = write_lora_dir(tmp_path / "adapter", random_lora(base, 2, 0), alpha=4.0)
    (lone / "adapter_config.json").unlink()
    flags = cli_flags(b, [m, lone]) if role == "model" else cli_flags(lone, [m, b])
    rc, _, err = run_cli(["merge", *flags, "-o", tmp_path / "out"], capsys)
    assert rc != 0 and "Traceback" not in err, err
    assert "PEFT LoRA adapter's factors" in err and "lora_A.weight" in err, err
    if role == "model":
        assert "adapter_config.json" in err and "same base architecture" not in err, err
    else:
        assert "never an adapter" in err, err
    assert_no_output(tmp_path / "out")


def test_json_and_a_checkpoint_inside_the_output_through_a_bind_mount_are_refused_first(tmp_path, capsys,
                                                                                       monkeypatch):
    """hp55 c60, c62: `tune -o src/out --force --json mnt/out/scores.json` (mnt a bind mount of src) and `adapt
    --checkpoint mnt/out/ck.safetensors -o src/out --force` ran the whole tune or training, then failed (the output
    replaced whole: the scores or the checkpoint went with it). Refused before the work (needs root for the mount)."""
    import subprocess

    import tiesmerge
    from tiesmerge.adamerging.run import check_adapt_outputs
    from tiesmerge.errors import OutputError

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "inputs" / "base", base)
    ms = [write_hf_dir(tmp_path / "inputs" / f"m{k}", m) for k, m in enumerate(models)]
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    tiesmerge.merge(str(b), [str(m) for m in ms], "ties", output=tmp_path / "src" / "out")  # an earlier output
    if subprocess.run(["mount", "--bind", str(tmp_path / "src"), str(tmp_path / "mnt")],
                      capture_output=True).returncode != 0:
        pytest.skip("no bind mount here (needs root)")
    try:
        called = tmp_path / "called"
        evaluator = tmp_path / "ev_through_mount.py"
        monkeypatch.syspath_prepend(str(tmp_path))
        evaluator.write_text(f"def score(state):\n    open({str(called)!r}, 'w').close()\n    return 1.0\n")
        scores = tmp_path / "mnt" / "out" / "scores.json"
        rc, _, err = run_cli(["tune", *cli_flags(b, ms), "--method", "ties", "--grid", "density=0.2",
                              "--evaluator", "ev_through_mount:score", "-o", tmp_path / "src" / "out", "--force",
                              "--json", scores], capsys)
        assert rc != 0 and "Traceback" not in err, err
        assert "--json lies at or inside the output directory" in err and "another mount" in err, err
        assert not called.exists() and not scores.exists()
        with pytest.raises(OutputError, match="the checkpoint lies at or inside the output directory .*, reached "
                                              "through another mount of it, which the finished run"):
            check_adapt_outputs(str(b), [str(m) for m in ms], [], output=tmp_path / "src" / "out", force=True,
                                checkpoint=tmp_path / "mnt" / "out" / "ck.safetensors", resume=False)
        # beside the output, through the mount: fine
        check_adapt_outputs(str(b), [str(m) for m in ms], [], output=tmp_path / "src" / "out", force=True,
                            checkpoint=tmp_path / "mnt" / "ck.safetensors", resume=False)
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], capture_output=True)


def _merged_output(tmp_path, capsys):
    """(base folder, model folders, a merged output of them) written by the command line."""
    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    out = tmp_path / "out"
    assert run_cli(["merge", *cli_flags(b, ms), "-o", out], capsys)[0] == 0
    return b, ms, out


@pytest.mark.parametrize("edit, said", [
    ({"written_stamps": [1, 2]}, "gives 'written_stamps' as a list, not each file's size and times"),
    ({"written_stamps": {"README.md": "x"}}, "records 'README.md' as \"x\", not its size and times"),
    ({"written_stamps": {"README.md": [10 ** 40, 1, 2]}}, "records 'README.md' as [1000000000"),
    ({"written_stamps": {"README.md": [1.5, 1, 2]}}, "records 'README.md' as [1.5, 1, 2], not its size"),
    ({"written": "README.md"}, "gives 'written' as a text, not a list of the files it wrote"),
    ({"written_stamps": None}, "has no 'written_stamps' (their sizes and times: null)"),  # hp69a c34, c38
])
def test_force_over_an_output_whose_record_of_its_files_was_edited_says_the_manifest_is_damaged(tmp_path, capsys,
                                                                                             edit, said):
    """An output's manifest edited so that its stamps are no record (a list, a text, a huge or fractional number) made
    `merge --force` say "--force would discard changes to 2 file(s) ... (2 of another size)" of files nobody had
    touched; a `written` given as a text said the output was an older tiesmerge's. Both are the manifest's damage."""
    import json

    b, ms, out = _merged_output(tmp_path, capsys)
    marker = json.loads((out / "tiesmerge.json").read_text())
    marker.update(edit)
    (out / "tiesmerge.json").write_text(json.dumps(marker))
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", out, "--force"], capsys)
    assert rc != 0 and "Traceback" not in err, err
    assert said in err and "the manifest is damaged" in err and "discard changes" not in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept


@pytest.mark.parametrize("dropped", [("exp_avg_sq",), ("exp_avg",), ("exp_avg", "exp_avg_sq"),
                                     ("step", "exp_avg", "exp_avg_sq")])
def test_an_adapt_checkpoint_lacking_part_of_adams_state_is_refused_as_damaged(tmp_path, dropped):
    """hp56b c06, c07: a checkpoint whose adam.exp_avg_sq (or exp_avg) was removed failed at the first resumed step
    with "unexpected KeyError: 'exp_avg_sq' ... a bug" (torch's Adam); one without any adam.* tensor resumed with a
    fresh Adam beside the learned coefficients, silently."""
    import json

    from safetensors.torch import save_file

    import tiesmerge
    from test_adapt import _data
    from test_hostile_fifth_pass import adapt_checkpoint_of_two_steps
    from tiesmerge.errors import ConfigError

    base, fts, kwargs, ck, tensors, meta = adapt_checkpoint_of_two_steps(tmp_path)
    for name in dropped:
        del tensors[f"adam.{name}"]
    save_file(tensors, str(ck), metadata=meta)
    lacking = ", ".join(f"adam.{k}" for k in ("step", "exp_avg", "exp_avg_sq") if k in dropped)
    with pytest.raises(ConfigError, match=f"the checkpoint is damaged \\(it lacks {lacking} of the optimizer's"):
        tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=4, checkpoint=ck, resume=True, **kwargs)
    assert json.loads(meta["step"]) == 2


def test_the_advice_for_an_edited_output_file_works_when_followed(tmp_path, capsys):
    """hp56b c12: `--force` over an output whose model card the user edited said "copy them out of that directory
    first"; the file copied out, --force refused again (the edited file is still there). Moving it out works."""
    import shutil

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    out = tmp_path / "out"
    assert run_cli(["merge", *cli_flags(b, ms), "-o", out], capsys)[0] == 0
    with open(out / "README.md", "a") as f:
        f.write("\nmy results: 99%\n")
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", out, "--force"], capsys)
    assert rc == 1 and "move them out of that directory first" in err and "copy them out" not in err, err
    shutil.move(out / "README.md", tmp_path / "my_card.md")  # the advice, followed
    assert run_cli(["merge", *cli_flags(b, ms), "-o", out, "--force"], capsys)[0] == 0
    assert "my results: 99%" in (tmp_path / "my_card.md").read_text()


@pytest.mark.parametrize("extra, said", [
    (["--strategy", "random", "--axis", "density", "--set", "lam=1", "--set", "lam=2"],
     "--set 'lam=2': lam is already set by --set 'lam=1'; set each option once"),
    (["--strategy", "random", "--axis", "lam", "--range", "lam=0.5:0.6", "--range", "lam=5:6"],
     "--range 'lam=5:6': lam already has --range 'lam=0.5:0.6'; give each option one --range"),
    (["--strategy", "grid", "--grid", "lam=1", "--popsize", "7"],
     "--popsize 7: a generation's size is CMA-ES's; the grid strategy has none"),
    (["--strategy", "random", "--axis", "lam", "--popsize", "2"],
     "--popsize 2: a generation's size is CMA-ES's; the random strategy has none"),
])
def test_search_options_given_twice_or_for_another_strategy_are_refused(tmp_path, capsys, monkeypatch, extra, said):
    """hp56b c20, c21: a second --set or --range of one option replaced the first silently (candidates drawn from
    5:6 only); c22: --popsize with the grid or random strategy was ignored (yet logged, so a resume without it was
    "another search"), or refused in CMA-ES's words."""
    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    (tmp_path / "ev_twice.py").write_text("def score(state):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, _, err = run_cli(["search", *cli_flags(b, ms), "--evaluator", "ev_twice:score", "--budget", "2", *extra,
                          "--dir", tmp_path / "s"], capsys)
    assert rc == 2 and said in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("edit, said", [
    (lambda line: line.replace('"score": ', '"score": ' + "9" * 400 + ", \"x\": "), "an integer of 400 digits"),
    (lambda line: line[:-1] + ', "deep": ' + "[" * 2000 + "]" * 2000 + "}", "nested too deep"),
    (lambda line: line[:-3], "not valid JSON"),
])
def test_a_damaged_search_log_line_is_said_in_the_readers_own_words(tmp_path, edit, said):
    """hp56b c01: a logged score replaced by a 400-digit integer was "not a scored candidate (not JSON)": the line is
    JSON; the number is past any range."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    log = tmp_path / "log.jsonl"
    grid = {"density": (0.2,), "lam": (1.0,)}
    run_search(base, models, "ties", lambda state: 0.5, grid=grid, log=str(log))
    lines = log.read_text().splitlines()
    lines[1] = edit(lines[1])
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=f"log.jsonl:2: the search log is corrupt \\(not a scored candidate: "
                                          f".*{said}"):
        run_search(base, models, "ties", lambda state: 0.5, grid=grid, log=str(log))


@pytest.mark.parametrize("forged", ["", "<script>" * 10, "A" * 64, 5])
def test_a_digest_cache_entry_that_is_no_sha256_is_hashed_again(tmp_path, capsys, monkeypatch, forged):
    """hp56a c83: the digest cache's entry for the base edited to "" or to "<script>..." (its stamp kept) was recorded
    in the output's manifest as the file's sha256."""
    import hashlib
    import json

    monkeypatch.setenv("TIESMERGE_CACHE_DIR", str(tmp_path / "cache"))
    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    assert run_cli(["merge", *cli_flags(b, ms), "-o", tmp_path / "o1"], capsys)[0] == 0
    cache = next((tmp_path / "cache").rglob("*.json"))
    entries = json.loads(cache.read_text())
    key = next(k for k in entries if k.endswith("base/model.safetensors"))
    entries[key]["sha256"] = forged
    cache.write_text(json.dumps(entries))
    assert run_cli(["merge", *cli_flags(b, ms), "-o", tmp_path / "o2"], capsys)[0] == 0
    truth = hashlib.sha256((b / "model.safetensors").read_bytes()).hexdigest()
    manifest = (tmp_path / "o2" / "tiesmerge.json").read_text()
    assert truth in manifest and (not isinstance(forged, str) or not forged or f'"{forged}"' not in manifest)
    assert '"sha256": ""' not in manifest


@pytest.mark.parametrize("kind, exclude", [("lora", ["model.layers.1.self_attn.q_proj"]),
                                           ("lora", r".*layers\.1\..*"),
                                           ("ia3", ["model.layers.1.self_attn.q_proj"])])
def test_a_merged_adapter_does_not_keep_the_first_adapters_exclusions(tmp_path, kind, exclude):
    """hp56a c126, c127, c165: the merged adapter's config was the first adapter's, exclude_modules included: where it
    named a module another adapter adapts, the merged factors (or vectors) were written for it and PEFT skipped that
    module silently."""
    import json

    import tiesmerge
    from helpers_adapters import IA3_MODULES, LORA_MODULES, peft_adapts, random_ia3, write_ia3_dir
    from helpers_ckpt import make_base

    pytest.importorskip("peft")
    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    if kind == "lora":
        kept = [m for m in LORA_MODULES if "layers.1." not in m] if isinstance(exclude, str) else \
            [m for m in LORA_MODULES if m not in exclude]
        first = write_lora_dir(tmp_path / "a0", {m: f for m, f in random_lora(base, 2, 0).items() if m in kept},
                               alpha=4.0, config={"exclude_modules": exclude})
        second = write_lora_dir(tmp_path / "a1", random_lora(base, 2, 1), alpha=4.0)
        adapted = LORA_MODULES
    else:
        first = write_ia3_dir(tmp_path / "a0", {m: v for m, v in random_ia3(base, 0).items() if m not in exclude})
        config = json.loads((first / "adapter_config.json").read_text())
        (first / "adapter_config.json").write_text(json.dumps({**config, "exclude_modules": exclude}))
        second = write_ia3_dir(tmp_path / "a1", random_ia3(base, 1))
        adapted = list(IA3_MODULES)
    out = tiesmerge.merge(str(b), [str(first), str(second)], "task_arithmetic", output=tmp_path / "out",
                          output_format="adapter", **({"rank": 8} if kind == "lora" else {}))
    written = json.loads((out / "adapter_config.json").read_text())
    assert written.get("exclude_modules") is None, written
    assert all(peft_adapts(written, m) for m in adapted), written


def test_grids_and_ranges_of_small_values_keep_them(tmp_path):
    """hp56b c40, c41: `--grid lam=1e-7:5e-7:1e-7` tuned lam=0.0 only (the base, outside the range: steps rounded to 6
    decimals), `--grid density=1e-7:4e-7:1e-7` was refused as "got 0.0", and random or CMA-ES candidates of `--range
    lam=1e-7:5e-7` (or weights) were all 0.0."""
    from tiesmerge.methods.base import steps
    from tiesmerge.tuning.space import Axis

    assert steps(1e-7, 5e-7, 1e-7) == (1e-7, 2e-7, 3e-7, 4e-7, 5e-7)
    assert steps(0.8, 1.0, 0.1) == (0.8, 0.9, 1.0) and steps(-0.3, 0.3, 0.3) == (-0.3, 0.0, 0.3)
    axis = Axis("lam", 1e-7, 5e-7)
    drawn = [axis.value([u]) for u in (0.0, 0.123456, 0.5, 1.0)]
    assert all(1e-7 <= v <= 5e-7 for v in drawn) and len(set(drawn)) == 4, drawn
    assert Axis("lam", 0.5, 2.0).value([0.1234567]) == 0.685185  # values past 1e-3 rounded as before
    weights = Axis("weights", 1e-7, 2e-7, per_model=2).value([0.0, 1.0])
    assert weights == (1e-7, 2e-7)


@pytest.mark.parametrize("grid, said", [
    ({"lam": "0.5", "density": [0.2]}, "grid['lam'] is '0.5', not a list of values"),
    ({"lam": "12", "density": [0.2]}, "grid['lam'] is '12', not a list of values"),
    ({"lam": [], "density": [0.2]}, "grid['lam'] is empty"),
    ({"lam": [True], "density": [0.2]}, "grid['lam'] holds True, not a finite number"),
    ({"lam": [1.0], "density": 0.2}, "grid['density'] is 0.2, not a list of values"),
])
def test_an_api_grid_of_the_wrong_shape_is_a_typed_error(grid, said):
    """hp56b c36, c36b, c36c, c38: tune(grid={'lam': '0.5'}) raised an untyped ValueError on '.', {'lam': '12'} swept
    lam 1 and 2 (the text read letter by letter), [True] ran as 1.0, and an empty list was "no grid point got a finite
    score", blaming the evaluator."""
    import tiesmerge
    from tiesmerge.errors import ConfigError

    base, models = make_family(2)
    calls = []
    with pytest.raises(ConfigError, match=re_escape(said)):
        tiesmerge.tune(base, models, "ties", lambda state: calls.append(1) or 0.5, grid=grid)
    assert not calls


@pytest.mark.parametrize("ranges, said", [({"lam": "0:1"}, "ranges['lam'] is '0:1', not a pair (low, high)"),
                                          ({"lam": (2.0, 1.0)}, "low and high must be finite, low < high"),
                                          ({"lam": (0.0, float("inf"))}, "low and high must be finite")])
def test_api_ranges_of_the_wrong_shape_are_a_typed_error(tmp_path, ranges, said):
    """hp56b c37, c37b: run_search(ranges={'lam': '0:1'}) raised an untyped "too many values to unpack"; a reversed
    pair (2, 1) was accepted where --range refuses it."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    with pytest.raises(ConfigError, match=re_escape(said)):
        run_search(base, models, "ties", lambda state: 0.5, strategy="random", budget=2, axes=("lam",),
                   ranges=ranges)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_a_search_log_of_another_format_version_is_said_so(tmp_path):
    """hp56b c28: a log whose header names tiesmerge-search/2 (a later version's) was "not a search log ... a search
    log is a file the search itself started"."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    log = tmp_path / "log.jsonl"
    grid = {"density": (0.2,), "lam": (1.0,)}
    run_search(base, models, "ties", lambda state: 0.5, grid=grid, log=str(log))
    log.write_text(log.read_text().replace('"tiesmerge-search/1"', '"tiesmerge-search/2"', 1))
    with pytest.raises(ConfigError, match=r"a search log of another format \('tiesmerge-search/2'; this tiesmerge "
                                          r"reads 'tiesmerge-search/1'\)"):
        run_search(base, models, "ties", lambda state: 0.5, grid=grid, log=str(log))


@pytest.mark.parametrize("output_format", ["model", "adapter"])
def test_a_dry_run_that_finds_room_means_the_merge_fits(tmp_path, capsys, output_format):
    """hp56a c38, c39: on a 28 KiB file system the dry run's free-space check passed ("output size 26.34 KiB") and
    the real run then filled the disk on config.json (the card, the manifest, the copied files and whole blocks were
    not counted; the dry run and the real run counted different things). On file systems of growing size: a dry run
    that passes means the real run fits, and a real run refused is refused by the free-space check, before writing."""
    import subprocess

    from helpers_ckpt import make_base

    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    (b / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    if output_format == "adapter":
        ms = [write_lora_dir(tmp_path / f"a{k}", random_lora(base, 4, k), alpha=8.0) for k in range(2)]
        extra = ["--output-format", "adapter", "--rank", "8"]
    else:
        ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(make_family(2)[1])]
        extra = []
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("no tmpfs mount here (needs root)")
    subprocess.run(["umount", str(disk)], capture_output=True)
    verdicts = []
    for kib in range(8, 200, 8):
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(disk)], check=True)
        try:
            dry, _, dry_err = run_cli(["merge", *cli_flags(b, ms), "-o", disk / "out", "--dry-run", *extra], capsys)
            real, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", disk / "out", *extra], capsys)
        finally:
            subprocess.run(["umount", str(disk)], check=True)
        assert dry == 0 or "the output needs" in dry_err, dry_err
        assert real == 0 or "the output needs" in err, (kib, err)  # refused before writing, never "disk is full"
        assert not (dry == 0 and "the output needs" not in dry_err and real != 0), (kib, dry_err, err)
        verdicts.append(real == 0)
        if real == 0:
            break
    assert verdicts[-1] and len(verdicts) > 1, verdicts  # a size too small was refused, a larger one fitted


@pytest.mark.parametrize("output_format", ["model", "adapter"])
def test_a_config_without_tie_word_embeddings_takes_its_model_types_default(tmp_path, capsys, output_format):
    """hp56a c90, c91, c169: a Llama base whose config.json lacks tie_word_embeddings (transformers' LlamaConfig
    defaults it to False) and stores its own lm_head was taken as tied: a LoRA saving new embed_tokens and lm_head
    copies (modules_to_save), or adapting lm_head, was refused as changing "a base that ties its output head"."""
    import json

    from helpers_ckpt import make_base
    from tiesmerge.io.align import ties_word_embeddings

    pytest.importorskip("transformers")
    assert ties_word_embeddings({"model_type": "llama"}) is False
    assert ties_word_embeddings({"model_type": "gpt2"}) is True and ties_word_embeddings({}) is True
    assert ties_word_embeddings({"model_type": "llama", "tie_word_embeddings": True}) is True
    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    config = json.loads((b / "config.json").read_text())
    del config["tie_word_embeddings"]
    (b / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(3)
    saved = {f"{name}.modules_to_save.default.weight": base[f"{name}.weight"] + 0.01 * torch.randn(
        base[f"{name}.weight"].shape, generator=g) for name in ("model.embed_tokens", "lm_head")}
    adapters = [write_lora_dir(tmp_path / f"a{k}", random_lora(base, 2, k), alpha=4.0, extra=saved if k == 0 else None,
                               config={"modules_to_save": ["embed_tokens", "lm_head"]} if k == 0 else None)
                for k in range(2)]
    extra = ["--output-format", "adapter"] if output_format == "adapter" else []
    rc, _, err = run_cli(["merge", *cli_flags(b, adapters), "-o", tmp_path / "out", *extra], capsys)
    assert rc == 0 and "ties its output head" not in err, err
    config["model_type"] = "gpt2"  # a type whose config class ties by default: refused, the copies named as two
    (b / "config.json").write_text(json.dumps(config))
    rc, _, err = run_cli(["merge", *cli_flags(b, adapters), "-o", tmp_path / "out2", *extra], capsys)
    assert rc != 0 and "Traceback" not in err, err
    assert "(modules_to_save) that differ, for a base that ties the two" in err, err


@pytest.mark.parametrize("stored, named", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_a_mergekit_model_plus_lora_fold_follows_the_configs_dtype(tmp_path, stored, named):
    """hp56a c104, c105: a MODEL+LORA entry was folded in the dtype of the base's first tensor, while transformers
    (mergekit's loader, dtype "auto") loads the whole base in its config's dtype: bfloat16 weights under a float32
    config differed from mergekit's fold in every value of an adapted tensor (up to 9e-4)."""
    from helpers_adapters import merged_as_model_plus_lora
    from helpers_ckpt import load_dir
    from test_hostile_fortyeighth_pass import _peft_folded_reference

    reference, targets = _peft_folded_reference(tmp_path, getattr(torch, stored), "llama", config_dtype=named)
    ours = merged_as_model_plus_lora(tmp_path)
    base = load_dir(tmp_path / "base")
    adapted = [n for n in reference if any(t in n for t in targets) and n in ours]
    assert adapted
    for name in adapted:  # mergekit's task arithmetic in float32: base + 1.0 * (folded - base), base as stored
        stored_base = base[name].float()
        assert torch.equal(ours[name], stored_base + (reference[name].float() - stored_base)), name


def test_an_evaluators_code_does_not_depend_on_the_working_folder(tmp_path, monkeypatch):
    """hp56b c62: torch.ops and torch.classes carry a relative __file__ ("_ops.py", "_classes.py"): with the working
    folder the evaluator's, they were counted as its helpers, files that do not exist, and the same search resumed
    from another folder was refused as "the evaluator's code: its module's source changed"."""
    import importlib
    import os

    from tiesmerge.tuning.driver import _evaluator_code

    (tmp_path / "ev_cwd.py").write_text("def score(state):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("ev_cwd")
    monkeypatch.chdir(tmp_path)
    here = _evaluator_code(module.score)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert _evaluator_code(module.score) == here
    assert all(os.path.isfile(f) for f in here), here


@pytest.mark.parametrize("fn, said", [
    (lambda m, b: m(b["x"]).sum(), "logits_fn returned a float32 tensor of shape (), not (B, C)"),
    (lambda m, b: [1, 2], "logits_fn returned a list, not (B, C)"),
    (lambda m, b: m(b["x"]).detach(), "the Fisher is zero for every parameter over 3 examples"),
])
def test_fisher_information_of_a_function_without_usable_logits_is_a_typed_error(fn, said):
    """hp56b c49, c50: fisher_information with a function returning a 0-d sum (an IndexError inside vjp) or a list (an
    AttributeError) failed untyped; detached logits gave a Fisher of zeros, which save() wrote and a merge used."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats import fisher_information

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    batches = [{"x": torch.randn(3, 4)}]
    with pytest.raises(ConfigError, match=re_escape(said)):
        fisher_information(module, batches, fn, kind="exact")



def test_a_zero_fisher_of_a_saturated_model_names_saturation_first():
    """hp71b c35: a model certain of one class on every example has a Fisher of zeros; the error blamed logits_fn's
    output as detached, and its hint named logits_fn, which the command line does not have."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats import fisher_information

    module = torch.nn.Linear(4, 3)
    with torch.no_grad():
        module.weight.zero_()
        module.bias.copy_(torch.tensor([1e4, 0.0, 0.0]))  # class 0 certain, whatever the input
    with pytest.raises(ConfigError, match="certain of one class on every example") as caught:
        fisher_information(module, [torch.randn(3, 4)], lambda m, b: m(b), kind="exact", per_example="loop")
    assert "check the model's outputs" in caught.value.hint

@pytest.mark.parametrize("per_example, kind", [("loop", "exact"), ("loop", "empirical"), ("vmap", "batched")])
def test_fisher_information_of_detached_logits_is_typed_on_every_path(per_example, kind):
    """hp63b c35: per_example="loop" (and the batched shortcut) on logits without a graph was autograd's bare
    RuntimeError "element 0 of tensors does not require grad"; vmap's path said it in words."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats import fisher_information

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    batches = [{"x": torch.randn(3, 4), "y": torch.tensor([0, 1, 2])}]
    with pytest.raises(ConfigError, match="logits_fn's output does not depend on the module's parameters"):
        fisher_information(module, batches, lambda m, b: m(b["x"]).detach(), kind=kind, per_example=per_example,
                           targets=lambda b: b["y"])


def test_gram_matrices_with_every_row_masked_is_a_typed_error(tmp_path):
    """hp56b c51: a token_mask dropping every row returned statistics of no tensor, and save() wrote a folder holding
    only its manifest."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats import gram_matrices

    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="no input rows reached any Linear layer over 3 examples: token_mask kept"):
        gram_matrices(module, [{"x": torch.randn(3, 4)}], lambda m, b: m(b["x"]),
                      token_mask=lambda b: torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize("shape, said", [("list", "the forward returned a list, not (B, classes) logits"),
                                         ("detached", "the forward's logits do not depend on the merge coefficients"),
                                         ("long", "the forward returned a int64 tensor of shape (2, 3)"),
                                         ("short", "of shape (1, 3) for a batch of 2")])
def test_adapt_with_a_forward_returning_unusable_logits_is_a_typed_error(shape, said):
    """hp56b c56, c58: a FunctionLogits forward returning a list failed as an AttributeError in the entropy, detached
    or integer logits as "element 0 of tensors does not require grad" from backward(); fewer rows than the batch
    passed."""
    import tiesmerge
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.forward import FunctionLogits

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    base = {k: v.detach().clone() for k, v in lin.state_dict().items()}
    models = [{k: v + 0.1 * torch.randn(v.shape) for k, v in base.items()} for _ in range(2)]
    rows = [{"text": "t", "x": torch.randn(4).tolist()} for _ in range(6)]

    def fn(m, x, task):
        out = m(x)
        return {"list": [1, 2], "detached": out.detach(), "long": out.long(), "short": out[:1]}[shape]

    forward = FunctionLogits(torch.nn.Linear(4, 3), fn, encode=lambda rs, task: torch.tensor([r["x"] for r in rs]))
    with pytest.raises(ConfigError, match=re_escape(said)):
        tiesmerge.adapt(base, models, [rows, rows], forward=forward, steps=2, batch_size=2)


def test_a_merged_adapters_card_and_manifest_say_what_it_is(tmp_path):
    """hp57a c80: an (IA)³ adapter output's card was titled "Merged LoRA adapter" and tagged lora; c27: a merged
    adapter's manifest said output dtype "same as base" of float32 factors on a bfloat16 base."""
    import json

    import tiesmerge
    from helpers_adapters import random_ia3, write_ia3_dir
    from helpers_ckpt import make_base

    base = make_base(0, dtype=torch.bfloat16)
    b = write_hf_dir(tmp_path / "base", base)
    ia3 = [write_ia3_dir(tmp_path / f"i{k}", random_ia3(base, k)) for k in range(2)]
    out = tiesmerge.merge(str(b), [str(p) for p in ia3], "task_arithmetic", output=tmp_path / "ia3",
                          output_format="adapter")
    card = (out / "README.md").read_text()
    assert "# Merged (IA)³ adapter" in card and "- ia3" in card and "LoRA" not in card, card
    loras = [write_lora_dir(tmp_path / f"l{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    out = tiesmerge.merge(str(b), [str(p) for p in loras], "task_arithmetic", output=tmp_path / "lora",
                          output_format="adapter", rank=4)
    assert json.loads((out / "tiesmerge.json").read_text())["output"]["dtype"] == "float32"
    assert "# Merged LoRA adapter" in (out / "README.md").read_text()


def test_force_over_a_manifest_whose_stamps_were_emptied_says_it_is_damaged(tmp_path, capsys):
    """hp57a c22: `written_stamps` emptied ({}) made --force call the unchanged files "of another size"."""
    import json

    b, ms, out = _merged_output(tmp_path, capsys)
    marker = json.loads((out / "tiesmerge.json").read_text())
    marker["written_stamps"] = {}
    (out / "tiesmerge.json").write_text(json.dumps(marker))
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", out, "--force"], capsys)
    assert rc == 1 and "records no size and times for it" in err and "of another size" not in err, err


@pytest.mark.parametrize("kwargs, said", [
    ({"models": "ab"}, "models must be a non-empty list"),
    ({"axes": "lam"}, "axes is 'lam', not a list of option names"),
    ({"fixed": "scope=per_tensor"}, "fixed is 'scope=per_tensor', not a mapping"),
    ({"start": {"lam": "x"}}, "start['lam'] is 'x', not a number"),
    ({"start": {"lam": 10 ** 400}}, "not a finite number"),
    ({"start": {"lam": float("nan")}}, "start['lam'] is nan, not a finite number"),
    ({"start": {"lam": 99.0}}, "outside the range searched"),
    ({"start": {"seed": 1.0}}, "start['seed']: not an option this search varies"),
    ({"start": "lam=1"}, "start is 'lam=1', not a mapping"),
    ({"start": {"lam": 10 ** 5000}}, "an integer of thousands of digits, not a finite number"),  # review: repr()
    ({"axes": ["lam", ["density"] * 3]}, "not a list of option names"),
])
def test_run_searchs_python_arguments_are_checked_for_their_shape(tmp_path, kwargs, said):
    """hp57b c32-c36: run_search took models="ab" as models a and b, axes="lam" letter by letter, and fixed= or start=
    of the wrong shape (a text, a list, 10**400) failed untyped; start values outside the range or of no axis were
    clamped or ignored silently."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    options = {"models": models, "strategy": "cmaes", "budget": 4, "axes": ["lam", "density"], **kwargs}
    given = options.pop("models")
    with pytest.raises(ConfigError, match=re_escape(said)):
        run_search(base, given, "ties", lambda state: 0.5, **options)


def test_tune_shows_lam_as_given_and_an_evaluators_unprintable_error_is_its_own(tmp_path, capsys, monkeypatch):
    """hp57b c26: tune printed lam 0.0001 as "lam=0.00" and 1.004 as "1.00"; c44: an evaluator's exception whose
    __str__ raises was "unexpected RuntimeError ... a bug in tiesmerge"; c45: a newline in its message read as a
    line of tiesmerge's own."""
    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    (tmp_path / "ev_fmt.py").write_text(
        "class Odd(Exception):\n    def __str__(self):\n        raise RuntimeError('str fails')\n"
        "def score(state):\n    return 0.5\n"
        "def odd(state):\n    raise Odd()\n"
        "def lines(state):\n    raise ValueError('bad\\nerror: forged')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    flags = [*cli_flags(b, ms), "--method", "ties", "--grid", "density=0.2", "--grid", "lam=0.0001,1.004"]
    rc, out, err = run_cli(["tune", *flags, "--evaluator", "ev_fmt:score"], capsys)
    assert rc == 0 and "lam=0.0001" in out and "lam=1.004" in out and "lam=0.00 " not in out, out
    rc, _, err = run_cli(["tune", *flags, "--evaluator", "ev_fmt:odd"], capsys)
    assert rc != 0 and "raised Odd" in err and "a bug in tiesmerge" not in err, err
    rc, _, err = run_cli(["tune", *flags, "--evaluator", "ev_fmt:lines"], capsys)
    assert rc != 0 and not any(line.startswith("error: forged") for line in err.splitlines()), err


def test_fine_steps_stay_inside_their_range():
    """hp57b c25: `lam=0.0012345:0.0012349:0.0000001` gave 0.001234 (below start) and 0.001235 four times, and
    `density=0.99999951:0.99999999:1e-7` a point of 1.0, past stop."""
    from tiesmerge.methods.base import steps

    assert steps(0.0012345, 0.0012349, 1e-7) == (0.0012345, 0.0012346, 0.0012347, 0.0012348, 0.0012349)
    assert steps(0.99999951, 0.99999999, 1e-7)[-1] <= 0.99999999
    assert len(steps(0.8, 3.0, 0.1)) == 23 and steps(1.0000001, 1.0000005, 1e-7)[0] == 1.0000001


def test_a_search_log_whose_header_could_not_be_written_is_not_left_behind(tmp_path, capsys, monkeypatch):
    """hp57b c11: the disk full on the log's first line (`ulimit -f 0`) left the new --dir with an empty log.jsonl;
    the advice ("run the same search again: it resumes") was then refused: "--dir ... holds files that are not a
    tiesmerge search's (log.jsonl)"."""
    import errno
    import os

    from tiesmerge.tuning import results_log

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    (tmp_path / "ev_full.py").write_text("def score(state):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["search", *cli_flags(b, ms), "--evaluator", "ev_full:score", "--grid", "lam=1", "--grid", "density=0.2",
            "--dir", tmp_path / "runs" / "s1"]
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(results_log.os, "fsync", full)
    rc, _, err = run_cli(argv, capsys)
    assert rc != 0 and "cannot append to the search log" in err, err
    assert not (tmp_path / "runs").exists(), list((tmp_path / "runs").rglob("*"))
    monkeypatch.setattr(results_log.os, "fsync", real_fsync)
    rc, _, err = run_cli(argv, capsys)  # the advice, followed
    assert rc == 0, err


def test_a_mergekit_recipes_union_refusal_names_its_own_keys(tmp_path, capsys):
    """hp57a c83: a mergekit recipe of base+LoRA entries with tokenizer_source: union was refused with "--vocab-policy
    union cannot be used here ... or use --vocab-policy truncate", a flag refused over mergekit recipes."""
    from helpers_adapters import model_plus_lora_recipe
    from helpers_ckpt import make_base

    base = make_base(0)
    write_hf_dir(tmp_path / "base", base)
    write_lora_dir(tmp_path / "lora", random_lora(base, 2, 0), alpha=4.0)
    recipe = model_plus_lora_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "tokenizer_source: union\n")
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "out"], capsys)
    assert rc != 0 and "Traceback" not in err, err
    said = "\n".join(line for line in err.splitlines() if line.startswith(("error:", "hint:")))
    assert "--vocab-policy" not in said and "with tokenizer_source: union in the recipe" in said, err
    assert_no_output(tmp_path / "out")


def test_a_search_log_line_holding_a_raw_line_separator_is_one_line(tmp_path):
    """hp57b c10: the log was split with splitlines(), which also cuts at U+2028 and U+0085 inside a JSON text (jq
    writes them raw): a valid line was "corrupt"."""
    import json

    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    log = tmp_path / "log.jsonl"
    grid = {"density": (0.2,), "lam": (1.0,)}
    run_search(base, models, "ties", lambda state: 0.5, grid=grid, log=str(log))
    lines = log.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[1])
    record["note"] = "checked\u2028by hand\u0085"
    lines[1] = json.dumps(record, ensure_ascii=False)
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_search(base, models, "ties", lambda state: 0.5, grid=grid, log=str(log))
    assert result.best.score == 0.5


def test_an_embedding_lora_on_a_resized_vocabulary_is_named_and_its_hint_leads_somewhere(tmp_path, capsys):
    """hp56a c147: an embedding LoRA of 34 rows on a 32-row base: --vocab-policy union was refused with "or use
    --vocab-policy truncate", and truncate said "the adapter was trained on another base model"."""
    from helpers_ckpt import make_base

    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    g = torch.Generator().manual_seed(1)
    factors = {"model.layers.0.self_attn.q_proj": (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g))}
    extra = {"model.embed_tokens.lora_embedding_A": torch.randn(2, 34, generator=g),
             "model.embed_tokens.lora_embedding_B": torch.randn(8, 2, generator=g)}
    lora = write_lora_dir(tmp_path / "a0", factors, alpha=4.0, extra=extra,
                          config={"target_modules": ["q_proj", "embed_tokens"]})
    other = write_lora_dir(tmp_path / "a1", random_lora(base, 2, 1), alpha=4.0)
    rc, _, err = run_cli(["merge", *cli_flags(b, [lora, other]), "-o", tmp_path / "o1", "--vocab-policy", "union"],
                         capsys)
    assert rc != 0 and "truncate" not in err and "merge those directories with --vocab-policy union" in err, err
    rc, _, err = run_cli(["merge", *cli_flags(b, [lora, other]), "-o", tmp_path / "o2"], capsys)
    assert rc != 0 and "trained with a resized vocabulary (34 rows, the base 32)" in err, err
    assert "another base model" not in err, err


@pytest.mark.parametrize("where", ["exclude", "target_modules", "alpha_pattern"])
def test_a_regex_repeat_count_past_32_bits_is_a_typed_error(tmp_path, capsys, where):
    """hp58a c32, c33, c49: `--exclude 'a{4294967296}'` (tsv_m), or such a pattern in an adapter config's
    target_modules or alpha_pattern, was "unexpected OverflowError ... a bug in tiesmerge" (2**31 was typed)."""
    from helpers_ckpt import make_base

    big = "q_proj{4294967296}"
    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    if where == "exclude":
        ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(make_family(2)[1])]
        extra = ["--method", "tsv_m", "--exclude", big]
    else:
        config = {"target_modules": big} if where == "target_modules" else {"alpha_pattern": {big: 8}}
        ms = [write_lora_dir(tmp_path / "a0", random_lora(base, 2, 0), alpha=4.0, config=config),
              write_lora_dir(tmp_path / "a1", random_lora(base, 2, 1), alpha=4.0)]
        extra = []
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", tmp_path / "out", *extra], capsys)
    assert rc != 0 and "Traceback" not in err and "a bug in tiesmerge" not in err, err
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("call, said", [
    ("tune_grid", "grid['lam'] holds an integer of 401 digits"),
    ("search_grid", "grid['lam'] holds an integer of 401 digits"),
    ("search_ranges", "ranges['lam'] is (0, 1000000000"),
    ("search_log", "log is a int, not a path"),
    ("tune_fixed", "'lam' both in the grid and fixed; drop one"),
])
def test_api_numbers_past_float_a_log_of_no_path_and_a_fixed_grid_option_are_typed(call, said):
    """hp58b c28-c30: 10**400 in tune's or run_search's grid, or in a range, was an untyped OverflowError; c32:
    run_search(log=5) a TypeError; c33: tune(fixed={'lam': 2.0}) beside a lam grid was ignored silently."""
    import tiesmerge
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    score = lambda state: 0.5  # noqa: E731
    with pytest.raises(ConfigError, match=re_escape(said)):
        if call == "tune_grid":
            tiesmerge.tune(base, models, "ties", score, grid={"lam": [10 ** 400], "density": [0.2]})
        elif call == "search_grid":
            run_search(base, models, "ties", score, grid={"lam": [10 ** 400], "density": [0.2]})
        elif call == "search_ranges":
            run_search(base, models, "ties", score, strategy="random", budget=2, axes=["lam"],
                       ranges={"lam": (0, 10 ** 400)})
        elif call == "search_log":
            run_search(base, models, "ties", score, grid={"lam": [1.0], "density": [0.2]}, log=5)
        else:
            tiesmerge.tune(base, models, "ties", score, grid={"lam": [1.0], "density": [0.2]}, fixed={"lam": 2.0})


def test_statistics_of_a_model_re_saved_in_place_say_its_weights_changed():
    """hp58a c48: a model's weights re-saved in place after its statistics: "these statistics were computed with
    another model (cls1b), not model 0 (cls1b)", the same folder called another model."""
    from pathlib import Path

    from tiesmerge.errors import IncompatibleCheckpointsError
    from tiesmerge.io.checkpoint import open_checkpoint
    from tiesmerge.manifest import check_stats_digests
    from tiesmerge.stats import StatsManifest, StatsSource
    from tiesmerge.stats.files import combine_digests

    then = [{"path": "/m0/model.safetensors", "sha256": "a" * 64}]
    now = [{"path": "/m0/model.safetensors", "sha256": "b" * 64}]
    digest = "files:" + combine_digests([(Path(f["path"]).name, f["sha256"]) for f in then])
    source = StatsSource(open_checkpoint({}, label="s0"), StatsManifest("fisher", 4, model_digest=digest,
                                                                        model="/m0"), "s0")
    with pytest.raises(IncompatibleCheckpointsError, match=r"computed with model 0 \(m0\) as its weights were then: "
                                                           r"its weight files changed since"):
        check_stats_digests([source], [now], ["m0"])
    source = StatsSource(open_checkpoint({}, label="s0"), StatsManifest("fisher", 4, model_digest=digest,
                                                                        model="/elsewhere"), "s0")
    with pytest.raises(IncompatibleCheckpointsError, match="computed with another model"):
        check_stats_digests([source], [now], ["m0"])


def test_an_adapt_checkpoint_of_another_format_version_is_said_so(tmp_path):
    """hp58b c44: a checkpoint whose format is tiesmerge-adapt-checkpoint/2 was "its fields are missing: no tiesmerge
    adapt metadata"."""
    from safetensors.torch import save_file

    import tiesmerge
    from test_adapt import _data
    from test_hostile_fifth_pass import adapt_checkpoint_of_two_steps
    from tiesmerge.errors import ConfigError

    base, fts, kwargs, ck, tensors, meta = adapt_checkpoint_of_two_steps(tmp_path)
    save_file(tensors, str(ck), metadata={**meta, "format": "tiesmerge-adapt-checkpoint/2"})
    with pytest.raises(ConfigError, match=r"an adapt checkpoint of another format \('tiesmerge-adapt-checkpoint/2'"):
        tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=4, checkpoint=ck, resume=True, **kwargs)


@pytest.mark.parametrize("first, second", [(1e38, None), (1.0, 0.0), (-1e-3, 1e-12)])
def test_an_adapt_checkpoint_whose_first_moment_outgrows_its_second_is_refused(tmp_path, first, second):
    """hp58b c45: adam.exp_avg edited to 1e38 (finite) resumed, and the run failed steps later with "the entropy ...
    is nan" and the advice to lower --lr. Adam's first moment is bounded by its second (m^2 <= ~53 v)."""
    from safetensors.torch import save_file

    import tiesmerge
    from test_adapt import _data
    from test_hostile_fifth_pass import adapt_checkpoint_of_two_steps
    from tiesmerge.errors import ConfigError

    base, fts, kwargs, ck, tensors, meta = adapt_checkpoint_of_two_steps(tmp_path)
    v = tensors["adam.exp_avg_sq"]
    m = tensors["adam.exp_avg"]
    assert bool((m.double() ** 2 <= 53 * v.double() + 1e-30).all())  # what a run writes holds the bound
    tensors["adam.exp_avg"] = torch.full_like(m, first)
    if second is not None:
        tensors["adam.exp_avg_sq"] = torch.full_like(v, second)
    save_file(tensors, str(ck), metadata=meta)
    with pytest.raises(ConfigError, match=r"the checkpoint is damaged \(adam.exp_avg holds .* where adam.exp_avg_sq "
                                          r"holds .*first moment is at most 7.27 x"):
        tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=4, checkpoint=ck, resume=True, **kwargs)


def _peft_ia3(tmp_path, dtype, kind, name, seed, modules=None):
    """A tiny base saved in ``dtype`` (once) and a trained (IA)³ adapter ``name`` on it (an attention module scaling
    outputs, a feed-forward one scaling inputs; GPT-2's Conv1D with biases), and PEFT's fold of it as mergekit makes
    it for a BASE+ADAPTER entry (the base loaded in its own dtype, PeftModel.from_pretrained, merge_and_unload)."""
    peft = pytest.importorskip("peft")

    from test_hostile_fortyeighth_pass import tiny_model

    model = tiny_model(kind, **({"attention_bias": True} if kind == "llama" else {}))
    targets, feedforward = {"llama": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
                            "t5": (["k", "v", "wo"], ["wo"]),  # T5's wo stays float32 in a float16 model
                            "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}[kind]
    if modules is not None:  # (targets, feedforward) of the adapter's own
        targets, feedforward = modules
    if not (tmp_path / "base").exists():
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):  # initialised to 0, where b·l would show nothing
                    p.normal_()
        model.to(dtype).save_pretrained(tmp_path / "base")
    cls = type(model)
    adapter = peft.get_peft_model(cls.from_pretrained(tmp_path / "base"), peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=kind == "gpt2"))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for n, p in adapter.named_parameters():
            if "ia3_l" in n:  # about 1, some far from it (-0.3, 2.7: l - 1 is not exact in float32 there)
                p.data = 1 + 0.8 * torch.randn(p.shape, generator=generator)
    adapter.save_pretrained(tmp_path / name)
    loaded = cls.from_pretrained(tmp_path / "base", torch_dtype=None)
    folded = peft.PeftModel.from_pretrained(loaded, tmp_path / name).merge_and_unload()
    folded.save_pretrained(tmp_path / f"{name}-folded")  # the full model mergekit merges for the entry
    return folded.state_dict()


@pytest.mark.parametrize("dtype_name, kind", [("bfloat16", "llama"), ("float32", "llama"), ("float16", "gpt2"),
                                              ("float32", "gpt2"), ("float16", "t5")])
def test_a_mergekit_ia3_entry_is_folded_as_mergekit_folds_it(tmp_path, dtype_name, kind):
    """hp57a c46, c53: a mergekit recipe's BASE+ADAPTER entries of (IA)³ adapters were merged as scaling vectors
    (τ = l − 1 trimmed and elected in l-space), while mergekit has PEFT fold each into the base (W·l, and b·l for
    an output-scaled module's bias) and merges the folded models: every scaled tensor differed, up to half its
    largest change. Now each entry is folded as PEFT folds it: weight 1 writes PEFT's merged model bit for bit, and
    a TIES merge of two entries equals the TIES merge of the two folded models."""
    from helpers_ckpt import load_dir
    from tiesmerge.cli.main import main

    dtype = getattr(torch, dtype_name)
    reference = _peft_ia3(tmp_path, dtype, kind, "ia3", 2)
    _peft_ia3(tmp_path, dtype, kind, "ia3b", 3)
    base = tmp_path / "base"
    stored = load_dir(base)
    changed = [n for n in reference if n in stored and not torch.equal(stored[n].float(), reference[n].float())]
    assert any(n.endswith(".bias") for n in changed) == (kind != "t5") and len(changed) >= 3  # b·l too

    def merged(method, entries, out, density=""):
        recipe = tmp_path / f"{out}.yaml"
        recipe.write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n" + "".join(
            f"  - {{model: {e}, parameters: {{weight: 1.0{density}}}}}\n" for e in entries) + "dtype: float32\n")
        assert main(["merge", str(recipe), "-o", str(tmp_path / out), "--no-progress"]) == 0
        return load_dir(tmp_path / out)

    # mergekit merges the model PEFT folded: the entry reads as that model, bit for bit (weight 1 of a float32
    # merge: base + (folded − base), which rounds like mergekit's own arithmetic where l is far from 1)
    for method, names, density in [("task_arithmetic", ["ia3"], ""), ("ties", ["ia3", "ia3b"], ", density: 0.5")]:
        as_entries = merged(method, [f"{base}+{tmp_path / n}" for n in names], f"{method}-entries", density)
        as_folded = merged(method, [tmp_path / f"{n}-folded" for n in names], f"{method}-folded", density)
        assert as_entries.keys() == as_folded.keys()
        for name in as_entries:
            assert torch.equal(as_entries[name], as_folded[name]), (method, name)
        if method == "task_arithmetic" and dtype != torch.float32:  # rounded to half: PEFT's own weights exactly
            assert all(torch.equal(as_entries[n], reference[n].float()) for n in changed if "wo" not in n)


def test_a_mergekit_ia3_entry_whose_fold_overflows_a_half_base_is_said_so(tmp_path, capsys):
    """The fold of an (IA)³ entry multiplies in the base's float16, as PEFT does: a factor of 1e5 (finite, within the
    adapter's bound) overflows there, as mergekit's own fold would; said as that, with what to do."""
    from safetensors.torch import load_file, save_file

    from helpers_ckpt import assert_no_output
    from tiesmerge.cli.main import main

    _peft_ia3(tmp_path, torch.float16, "gpt2", "ia3", 2)
    vectors = load_file(tmp_path / "ia3" / "adapter_model.safetensors")
    key = next(k for k in vectors if "c_attn" in k)
    vectors[key] = vectors[key].clone()
    vectors[key].view(-1)[0] = 1e5
    save_file(vectors, tmp_path / "ia3" / "adapter_model.safetensors")
    base = tmp_path / "base"
    (tmp_path / "r.yaml").write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                                     f"  - {{model: {base}+{tmp_path / 'ia3'}, parameters: {{weight: 1.0}}}}\n"
                                     "dtype: float32\n")
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "(IA)³ vector of module 'transformer.h.0.attn.c_attn'" in err and "overflows float16, as mergekit's " \
        "fold of this MODEL+ADAPTER entry does" in err and "Traceback" not in err, err
    assert_no_output(tmp_path / "out")


def _mergekit_recipe(tmp_path, name, method, entries, density=""):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(f"merge_method: {method}\nbase_model: {tmp_path / 'base'}\nmodels:\n" + "".join(
        f"  - {{model: {e}, parameters: {{weight: 1.0{density}}}}}\n" for e in entries) + "dtype: float32\n")
    return recipe


@pytest.mark.parametrize("beside", ["full model", "other targets"])
def test_a_mergekit_ia3_entry_merges_beside_other_entries_and_validates(tmp_path, capsys, beside):
    """hp59a c31-c36: an (IA)³ entry beside a full model, or beside an (IA)³ entry scaling other modules, failed
    with "unexpected KeyError ... a bug" (a tensor the entry does not scale), and validate and the dry run refused
    the recipe that merge ran ("merge only with other (IA)³ adapters ... list them as BASE+ADAPTER entries": they
    were). Now the entry reads 0 where it scales nothing, and the plan folds the entries as the merge does."""
    from helpers_ckpt import load_dir
    from tiesmerge.cli.main import main

    base = tmp_path / "base"
    _peft_ia3(tmp_path, torch.float32, "llama", "ia3", 2)
    _peft_ia3(tmp_path, torch.float32, "llama", "other", 3,
              modules=None if beside == "full model" else (["k_proj", "up_proj"], ["up_proj"]))
    second = f"{base}+{tmp_path / 'other'}" if beside == "other targets" else tmp_path / "other-folded"
    recipe = _mergekit_recipe(tmp_path, "mix", "ties", [f"{base}+{tmp_path / 'ia3'}", second], ", density: 0.5")
    folded = _mergekit_recipe(tmp_path, "folded", "ties", [tmp_path / "ia3-folded", tmp_path / "other-folded"],
                              ", density: 0.5")
    for command in (["validate", str(recipe)], ["merge", str(recipe), "--dry-run"]):
        assert main(command) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["merge", str(recipe), "-o", str(tmp_path / "o1"), "--no-progress"]) == 0, capsys.readouterr().err
    assert main(["merge", str(folded), "-o", str(tmp_path / "o2"), "--no-progress"]) == 0
    ours, want = load_dir(tmp_path / "o1"), load_dir(tmp_path / "o2")
    assert ours.keys() == want.keys() and all(torch.equal(ours[n], want[n]) for n in ours)


def test_mergekit_ia3_entries_written_as_an_adapter_are_said_to_merge_as_vectors(tmp_path, capsys):
    """hp59a c13, c14: a mergekit recipe's (IA)³ entries with --output-format adapter merged in l-space without a
    word (the README says such entries trim and elect on the folded weights), and beside a full model the refusal's
    hint told the user to list them as BASE+ADAPTER entries, which they were."""
    from helpers_ckpt import assert_no_output
    from tiesmerge.cli.main import main

    base = tmp_path / "base"
    _peft_ia3(tmp_path, torch.float32, "llama", "ia3", 2)
    _peft_ia3(tmp_path, torch.float32, "llama", "other", 3)
    both = _mergekit_recipe(tmp_path, "both", "ties", [f"{base}+{tmp_path / n}" for n in ("ia3", "other")],
                            ", density: 0.5")
    capsys.readouterr()
    assert main(["merge", str(both), "--output-format", "adapter", "-o", str(tmp_path / "a1"), "--no-progress"]) == 0
    assert "merged as scaling vectors (l − 1) into an (IA)³ adapter, not as mergekit merges them" in \
        capsys.readouterr().err
    mixed = _mergekit_recipe(tmp_path, "mixed", "ties", [f"{base}+{tmp_path / 'ia3'}", tmp_path / "other-folded"],
                             ", density: 0.5")
    assert main(["merge", str(mixed), "--output-format", "adapter", "-o", str(tmp_path / "a2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot hold this recipe's (IA)³ entries beside" in err and "a full model" in err, err
    assert "list them as BASE+ADAPTER" not in err
    assert_no_output(tmp_path / "a2")


def test_merges_finish_and_a_deep_origin_are_refused_before_the_merge(tmp_path):
    """hp59a c08, c09: merge(origin=<a dict nested 5000 deep>) raised RecursionError from the YAML writer, and
    merge(finish=5) a TypeError after the whole merge ran."""
    import tiesmerge
    from helpers_ckpt import assert_no_output
    from tiesmerge.errors import ConfigError

    base, models = make_family(2)
    deep: dict = {}
    for _ in range(5000):
        deep = {"a": deep}
    with pytest.raises(ConfigError, match="origin holds a value that cannot be written"):
        tiesmerge.merge(base, models, "ties", origin=deep, output=tmp_path / "o")
    with pytest.raises(ConfigError, match="finish must be a function of .staging folder, manifest., got int"):
        tiesmerge.merge(base, models, "ties", finish=5, output=tmp_path / "o")
    assert_no_output(tmp_path / "o")


@pytest.mark.parametrize("count, said", [(torch.tensor(2 + 0j), "complex64"),
                                         (torch.tensor(2, dtype=torch.int8), "int8"),
                                         (torch.tensor(2, dtype=torch.uint8), "uint8"),
                                         (torch.tensor(2, dtype=torch.int64), "int64")])
def test_an_adapt_checkpoint_whose_adam_step_is_no_float_tensor_is_refused(tmp_path, count, said):
    """hp59b c17, c18, c46: adam.step as a complex, int8 or uint8 tensor of the right value passed the checkpoint's
    checks and failed in torch's Adam ("unexpected RuntimeError ... ComplexFloat", an int8 127 wrapping to -128,
    a uint8 255 to 0: "ZeroDivisionError", each "a bug")."""
    from safetensors.torch import save_file

    import tiesmerge
    from test_adapt import _data
    from test_hostile_fifth_pass import adapt_checkpoint_of_two_steps
    from tiesmerge.errors import ConfigError

    base, fts, kwargs, ck, tensors, meta = adapt_checkpoint_of_two_steps(tmp_path)
    assert tensors["adam.step"].dtype == torch.float32 and float(tensors["adam.step"]) == 2
    tensors["adam.step"] = count
    save_file(tensors, str(ck), metadata=meta)
    with pytest.raises(ConfigError, match=f"the checkpoint is damaged \\(adam.step is {said}, not float32"):
        tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=4, checkpoint=ck, resume=True, **kwargs)


def test_tune_and_run_search_take_numpy_numbers_and_refuse_odd_methods_and_executors():
    """hp59b c21-c25: tune(method=None) and run_search(method=None / 3) failed as AttributeError / a TypeError of
    dataclasses, run_search(executor=3) as an AttributeError; numpy's scalars in a grid, a range, a budget or a seed
    were refused as "not a finite number", "not a whole number" (they are)."""
    import numpy as np

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search, tune

    base, models = make_family(2)

    def score(state):
        return float(sum(v.float().sum() for v in state.values()))

    for method in (None, b"ties", 3):
        with pytest.raises(ConfigError, match="method must be a name or a method config"):
            tune(base, models, method, score, grid={"density": [0.1], "lam": [1.0]})
        with pytest.raises(ConfigError, match="method must be a name or a method config"):
            run_search(base, models, method, score, strategy="random", budget=2, axes=("density", "lam"))
    with pytest.raises(ConfigError, match="executor is a int, not an executor of the search"):
        run_search(base, models, "ties", score, grid={"density": [0.1], "lam": [1.0]}, executor=3)
    plain = tune(base, models, "ties", score, grid={"density": [0.1], "lam": [1.0, 2.0]})
    numpy = tune(base, models, "ties", score, grid={"density": [np.float64(0.1)], "lam": [np.float32(1.0), 2]})
    assert [p.score for p in numpy.points] == [p.score for p in plain.points]
    drawn = run_search(base, models, "ties", score, strategy="random", budget=np.int64(2), seed=np.int64(3),
                       axes=("density", "lam"), ranges={"lam": (np.float32(0.5), np.float32(1.0))})
    again = run_search(base, models, "ties", score, strategy="random", budget=2, seed=3, axes=("density", "lam"),
                       ranges={"lam": (0.5, 1.0)})
    assert [t.options for t in drawn.trials] == [t.options for t in again.trials]
    assert all(type(v) is float for t in drawn.trials for v in t.options.values() if not isinstance(v, tuple))


def test_adapts_arguments_are_checked_before_the_training(tmp_path):
    """hp59b c30-c33, c40: adapt(lr=10**400) and adapt(clamp=("a", "b")) failed as OverflowError / TypeError,
    tasks of bytes as a JSON TypeError at the end, a bytes output as pathlib's TypeError, and force="yes" was
    refused after the whole training, its checkpoint left beside the output. numpy's scalars are numbers there too."""
    import numpy as np

    import tiesmerge
    from test_adapt import _data, _family, _forward
    from tiesmerge.errors import ConfigError

    base, fts = _family()
    kwargs = dict(forward=_forward(), granularity="task", batch_size=5)
    for bad, said in [(dict(lr=10**400), "lr must be a finite number, got an integer of 401 digits"),
                      (dict(clamp=("a", "b")), "clamp must be .low, high., two numbers, got .'a', 'b'."),
                      (dict(tasks=[b"x", b"y"]), "tasks must be a list of names"),
                      (dict(force="yes", output=tmp_path / "o"), "force='yes' must be True or False")]:
        with pytest.raises(ConfigError, match=said):
            tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=2, **kwargs, **bad)
        assert list(tmp_path.iterdir()) == []  # nothing trained, no checkpoint beside the output
    result = tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=np.int64(2), lr=np.float32(0.05),
                             output=os.fsencode(tmp_path / "out"), **kwargs)
    assert (tmp_path / "out" / "tiesmerge.json").is_file() and result.coefficients.shape[0] == 2


def test_statistics_collectors_check_their_arguments_first(tmp_path):
    """hp59b c49, c50, c52: fisher_information(None, ...), (module, None, ...), gram_matrices("m", ...) failed as
    AttributeError / TypeError inside torch or tqdm, a bytes model path as pathlib's TypeError, and
    embedding_rows="no" was read as True."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats import fisher_information, gram_matrices

    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    batches = [torch.randn(2, 4) for _ in range(2)]

    def run(m, b):
        return m(b)

    for call, said in [(lambda: fisher_information(None, batches, run), "module is a NoneType, not a torch.nn.Module"),
                       (lambda: fisher_information(module, None, run), "batches is a NoneType, not an iterable"),
                       (lambda: fisher_information(module, batches, 5), "logits_fn is a int, not a function"),
                       (lambda: gram_matrices("m", batches, run), "module is a str, not a torch.nn.Module"),
                       (lambda: gram_matrices(module, batches, run, token_mask=3), "token_mask is a int"),
                       (lambda: fisher_information(module, batches, run, per_example="loop", embedding_rows="no"),
                        "embedding_rows='no' must be True or False"),
                       (lambda: fisher_information(module, batches, run, model=3), "model is a int, not the path")]:
        with pytest.raises(ConfigError, match=said):
            call()
    write_hf_dir(tmp_path / "m", {"w": torch.zeros(2)})
    stats = gram_matrices(module, batches, run, model=os.fsencode(tmp_path / "m"))
    assert stats.manifest.model == str(tmp_path / "m")


def test_the_apis_odd_arguments_are_typed_errors(tmp_path):
    """hp59a c10, c11, c56, c58, c59: merge(base, 5) / (base, None) failed as TypeError in resolve_sources,
    load_recipe(5) as pathlib's TypeError, analyze(methods="ties") as "unknown method 't'", describe_plan(5, ...) as
    an AttributeError, and origin={"x": nan} wrote NaN into the manifest, which is then no JSON."""
    import tiesmerge
    from tiesmerge.errors import ConfigError
    from tiesmerge.recipe import load_recipe

    base, models = make_family(2)
    for bad in (5, None):
        for call in (tiesmerge.merge, tiesmerge.plan_merge, tiesmerge.base_distance):
            with pytest.raises(ConfigError, match="models must be a non-empty list"):
                call(base, bad)
        with pytest.raises(ConfigError, match="the recipe is a .*, not the path of a YAML file"):
            load_recipe(bad)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: ties\nbase: b\nmodels: [m0, m1]\n")
    assert load_recipe(os.fsencode(recipe)).method.name == "ties"
    for name in ("methods", "curve"):
        with pytest.raises(ConfigError, match=f"{name} must be a list, got str"):
            tiesmerge.analyze(base, models, **{name: "ties" if name == "methods" else "0.1"})
    with pytest.raises(ConfigError, match="plan is a int, not a plan"):
        tiesmerge.describe_plan(5, "ties", 1)
    with pytest.raises(ConfigError, match="n_models must be the number of models merged"):
        tiesmerge.describe_plan(tiesmerge.plan_merge(base, models), "ties", -3)
    with pytest.raises(ConfigError, match="origin holds a value that cannot be written"):
        tiesmerge.merge(base, models, "ties", origin={"x": float("nan")}, output=tmp_path / "o")
    assert_no_output(tmp_path / "o")


@pytest.mark.parametrize("case", ["config float16", "past float32 entry", "past float32 command line"])
def test_an_ia3_fold_that_overflows_is_said_with_its_dtype_and_cause(tmp_path, capsys, case):
    """hp59a c46, c68: float32 weights under a config naming float16 overflowed in the fold with the advice "give the
    base in float32" (it is; the config's dtype is what transformers loads), and a float32 fold past 3.4e38 (huge
    finite weights times a factor of 1e6) was "damaged" (no input holds an Inf), on the command line too."""
    import json

    from safetensors.torch import load_file, save_file

    from tiesmerge.cli.main import main

    _peft_ia3(tmp_path, torch.float32, "llama", "ia3", 2)
    base = tmp_path / "base"
    vectors = load_file(tmp_path / "ia3" / "adapter_model.safetensors")
    key = next(k for k in vectors if "q_proj" in k)
    vectors[key] = torch.full_like(vectors[key], 1e6)
    save_file(vectors, tmp_path / "ia3" / "adapter_model.safetensors")
    if case == "config float16":
        config = json.loads((base / "config.json").read_text())
        config["dtype"] = "float16"
        (base / "config.json").write_text(json.dumps(config))
    else:
        weights = load_file(base / "model.safetensors")
        name = next(n for n in weights if "q_proj.weight" in n)
        weights[name] = weights[name] * 1e35
        save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    recipe = _mergekit_recipe(tmp_path, "r", "task_arithmetic", [f"{base}+{tmp_path / 'ia3'}"])
    command = ["merge", "--base", str(base), "--model", str(tmp_path / "ia3"), "--method", "task_arithmetic",
               "--lam", "1"] if case == "past float32 command line" else ["merge", str(recipe)]
    capsys.readouterr()
    assert main([*command, "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "damaged" not in err and "Traceback" not in err, err
    if case == "config float16":
        assert "(stored float32; transformers loads it in float16, the dtype the base's config.json names) " \
               "overflows float16" in err and "config.json to float32" in err, err
    else:
        assert "overflows float32" in err and "3.4e38" in err, err
    assert_no_output(tmp_path / "out")


def test_the_notes_of_pass_59_each_fixed(tmp_path):
    """hp59 NOTEs: a search log saved with a byte-order mark was "damaged" (hint: delete it, scores lost);
    analyze(seed=1.5), merge(budget_floor="yes"), adapt(steps=10**400) (ran until killed) and adapt(max_length=0)
    were accepted; a resumed search's changed --range was not among the options its message listed."""
    import tiesmerge
    from test_adapt import _data, _family, _forward
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    calls = []

    def score(state):
        calls.append(1)
        return float(sum(v.float().sum() for v in state.values()))

    log = tmp_path / "log.jsonl"
    first = run_search(base, models, "ties", score, grid={"density": [0.1, 0.2], "lam": [1.0]}, log=str(log))
    log.write_bytes(b"\xef\xbb\xbf" + log.read_bytes())
    calls.clear()
    again = run_search(base, models, "ties", score, grid={"density": [0.1, 0.2], "lam": [1.0]}, log=str(log))
    assert [t.score for t in again.trials] == [t.score for t in first.trials] and len(calls) <= 2
    with pytest.raises(ConfigError, match="seed must be a whole number from 0"):
        tiesmerge.analyze(base, models, seed=1.5)
    with pytest.raises(ConfigError, match="budget_floor='yes' must be True or False"):
        tiesmerge.merge(base, models, "ties", budget_floor="yes")
    ab, fts = _family()
    for bad, said in [(dict(steps=10**400), "steps must be at most 1,000,000,000"),
                      (dict(max_length=0), "max_length must be a whole number of tokens >= 1")]:
        with pytest.raises(ConfigError, match=said):
            tiesmerge.adapt(ab, fts, _data(), "task_arithmetic", forward=_forward(), **{"steps": 2, **bad})
    with pytest.raises(ConfigError, match=r"axis lam: range 0.5:1.5 there, 0.5:2.5 now"):  # (hp85b c14: named)
        run_search(base, models, "ties", score, strategy="random", budget=2, axes=("density", "lam"),
                   ranges={"lam": (0.5, 1.5)}, log=str(tmp_path / "r.jsonl"))
        run_search(base, models, "ties", score, strategy="random", budget=2, axes=("density", "lam"),
                   ranges={"lam": (0.5, 2.5)}, log=str(tmp_path / "r.jsonl"))


@pytest.mark.parametrize("value", [1.7e308, 1e308, -0.5])
def test_an_adapt_checkpoints_entropy_out_of_range_is_damaged(tmp_path, value):
    """hp60b c10, c13: an adapt checkpoint whose entropy history held 1.7e308 (finite) resumed, and failed after the
    whole training as "unexpected ValueError ... a bug"; 1e308 each wrote a mean of Infinity into the report's JSON.
    An entropy (or cross-entropy) lies in [0, 1e6]."""
    import json

    from safetensors.torch import save_file

    import tiesmerge
    from test_adapt import _data
    from test_hostile_fifth_pass import adapt_checkpoint_of_two_steps
    from tiesmerge.errors import ConfigError

    base, fts, kwargs, ck, tensors, meta = adapt_checkpoint_of_two_steps(tmp_path)
    rows = json.loads(meta["entropy"])
    meta["entropy"] = json.dumps([[value] * len(r) for r in rows])
    save_file(tensors, str(ck), metadata=meta)
    with pytest.raises(ConfigError, match=r"the checkpoint is damaged \(its entropy history is not 2 rows of 2 numbers "
                                          r"from 0 to 1e\+06"):
        tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=4, checkpoint=ck, resume=True, **kwargs)


def test_a_search_log_that_cannot_be_made_is_refused_before_any_scoring(tmp_path):
    """hp60b c20, c21: run_search(log=...) under a file, with a 300-byte name, or in /proc failed with an untyped
    FileExistsError / NotADirectoryError / ENAMETOOLONG once the first candidate was scored (the log is made with
    it), leaving the folders it had made."""
    from tiesmerge.errors import OutputError
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    calls = []

    def score(state):
        calls.append(1)
        return 0.5

    (tmp_path / "file").write_text("x")
    for log, said in [(tmp_path / "file" / "log.jsonl", "is not a folder"),
                      (tmp_path / "file" / "sub" / "log.jsonl", "is not a folder"),
                      (tmp_path / "new" / ("y" * 300) / "log.jsonl", "is 300 bytes, past the file system's")]:
        with pytest.raises(OutputError, match=said):
            run_search(base, models, "ties", score, grid={"density": [0.1], "lam": [1.0]}, log=str(log))
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    # /proc refuses the folder only when it is made (root may "write" there by its mode): typed, nothing left
    with pytest.raises(OutputError, match="cannot create the search log"):
        run_search(base, models, "ties", score, grid={"density": [0.1], "lam": [1.0]},
                   log="/proc/tiesmerge-none/log.jsonl")


@pytest.mark.parametrize("method", [5, None, b"ties", {"name": "ties"}, ("ties",), ["x"]])
def test_a_method_spec_of_another_type_is_a_typed_error(method):
    """hp60a c22, c42: analyze(methods=[5]) failed as "'int' object has no attribute 'name'", describe_plan(plan,
    ['ties'], 2) as "must be called with a dataclass type or instance" (untyped)."""
    import tiesmerge
    from tiesmerge.errors import ConfigError

    base, models = make_family(2)
    with pytest.raises(ConfigError, match="method must be a name or a method config"):
        tiesmerge.analyze(base, models, methods=[method])
    with pytest.raises(ConfigError, match="method must be a name or a method config"):
        tiesmerge.describe_plan(tiesmerge.plan_merge(base, models), method, 2)


def test_a_merged_ia3_adapter_beyond_what_an_adapter_holds_is_refused(tmp_path, capsys):
    """hp60a c37: --lam 1e30 over (IA)³ adapters wrote vectors of up to 3.5e29 into the merged adapter without a word,
    which tiesmerge itself then refused as "damaged" (beyond any trained adapter's 1e6)."""
    from helpers_adapters import random_ia3, write_ia3_dir
    from helpers_ckpt import make_base

    base = make_base(2)
    b = write_hf_dir(tmp_path / "base", base)
    adapters = [write_ia3_dir(tmp_path / f"ia3_{k}", random_ia3(base, k)) for k in range(2)]
    rc, _, err = run_cli(["merge", "--base", b, "--model", adapters[0], "--model", adapters[1], "--method",
                          "task_arithmetic", "--lam", "1e30", "--output-format", "adapter", "-o", tmp_path / "out"],
                         capsys)
    assert rc == 1 and "scales the weights by up to" in err and "closer to 0" in err and "Traceback" not in err, err
    assert_no_output(tmp_path / "out")


def test_pass_60_merge_side_messages(tmp_path, capsys):
    """hp60a c11, c38: a flag's bad value over a recipe was blamed on the recipe file ("r8.yaml: device 'tpu' ...",
    which names no device); c52: slerp called a last catch-all rule "shadowed" when a LoRA entry's few tensors all
    matched the filter before it, advising to put it first; c60: a BASE+ADAPTER whose adapter_config.json is a FIFO
    was "no adapter_config.json ... list a full model"."""
    import os
    import warnings

    from tiesmerge.registry import make_method

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    recipe = tmp_path / "t1.yaml"
    recipe.write_text(f"method: ties\nbase: {b}\nmodels: [{{path: {ms[0]}}}, {{path: {ms[1]}}}]\n")
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "o", "--device", "tpu"], capsys)
    assert rc == 2 and f"{recipe} with --device from the command line" in err, err

    slerp = make_method("slerp", {"t_by_name": "self_attn=0.3;*=0.5"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slerp.check_tensors({"model.layers.0.self_attn.q_proj.weight": (4, 4)})
    assert not [w for w in caught if "shadowed" in str(w.message)], [str(w.message) for w in caught]

    lora = write_lora_dir(tmp_path / "ad", random_lora(base, 2, 0), alpha=4)
    (lora / "adapter_config.json").unlink()
    os.mkfifo(lora / "adapter_config.json")
    mk = tmp_path / "mk.yaml"
    mk.write_text(f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n"
                  f"  - {{model: {b}+{lora}, parameters: {{weight: 1.0}}}}\n")
    rc, _, err = run_cli(["merge", mk, "-o", tmp_path / "o2"], capsys)
    assert rc != 0 and "FIFO" in err and "no adapter_config.json" not in err, err


def test_outputs_that_cannot_be_made_are_refused_before_the_work(classifiers, tmp_path, capsys, monkeypatch):
    """hp60b c41, c43, c45: `adapt -o .` failed as "unexpected ValueError: PosixPath('.') has an empty name";
    adapt and tune with -o NEW/<a 300-byte name> trained (scored the whole grid), then failed, leaving NEW/ and the
    checkpoint (a rerun with --resume failed the same way at once)."""
    root, base, fts, data = classifiers
    common = ["--base", str(base), *sum((["--model", str(f)] for f in fts), [])]
    adapt = ["adapt", *common, "--data", str(data), "--data", str(data), "--steps", "2", "--batch-size", "2"]
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    rc, _, err = run_cli([*adapt, "-o", "."], capsys)
    assert rc == 1 and "working" in err and "Traceback" not in err and "a bug" not in err, err
    long = tmp_path / "new" / ("x" * 300)
    rc, _, err = run_cli([*adapt, "-o", long], capsys)
    assert rc == 1 and "is 300 bytes, past the file system's" in err and "checkpoint" not in err, err
    (tmp_path / "ev60.py").write_text("def score(state):\n    raise SystemExit('scored')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, _, err = run_cli(["tune", *common, "--evaluator", "ev60:score", "--grid", "density=0.1", "--grid", "lam=1",
                          "-o", long], capsys)
    assert rc == 1 and "is 300 bytes, past the file system's" in err and "scored" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev60.py", "work"] and not any((tmp_path / "work").iterdir())


def test_a_users_folder_named_like_a_dead_runs_temporary_is_kept(tmp_path, capsys, monkeypatch):
    """hp60b c51, c53: the next write into a folder removed every `.tiesmerge-tmp-<host>-<dead pid>-*` folder there:
    one holding a tune's validation data, an evaluator's module, the working folder or a search's --dir and its log
    went with it. Only what proves to be tiesmerge's (its mark, nothing at all, or a finished output whose manifest
    lists every file) is removed, and never a folder holding the working folder or an import path."""
    import tiesmerge
    from tiesmerge.io.writer import OWNED, remove_stale
    from tiesmerge.scratch import host_tag

    def named(tag):
        return tmp_path / f".tiesmerge-tmp-{host_tag()}-999999-{tag}"  # pid 999999: no such process

    data, work, module, ours, empty = (named(t) for t in ("data", "work", "mod", "ours", "empty"))
    for folder in (data, work, module, ours, empty):
        folder.mkdir()
    (data / "val.jsonl").write_text('{"text": "x", "label": 0}\n')
    (data / "log.jsonl").write_text("{}\n")
    (module / "ev.py").write_text("def score(state):\n    return 0.5\n")
    (work / OWNED).touch()  # even a marked one, while it holds the working folder
    (ours / OWNED).touch()
    (ours / "model.safetensors").write_bytes(b"half written")
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(module))
    assert sorted(remove_stale(tmp_path)) == sorted([ours.name, empty.name])
    assert (data / "val.jsonl").is_file() and (data / "log.jsonl").is_file() and (module / "ev.py").is_file()
    assert work.is_dir()
    base, models = make_family(2)
    tiesmerge.merge(base, models, "ties", output=tmp_path / "out")  # a merge beside them: they stay
    assert (data / "val.jsonl").is_file() and (module / "ev.py").is_file() and work.is_dir()
    assert not (tmp_path / "out" / OWNED).exists() and OWNED not in (tmp_path / "out" / "tiesmerge.json").read_text()


def test_pass_61_merge_side(tmp_path, capsys):
    """hp61a c31: a new output where a killed --force run parked the previous one was refused only after its whole
    merge ("exists and is not empty", the parked output never named); c41: a statistics folder given as a model had
    its Fisher values merged as weights."""

    import tiesmerge
    from tiesmerge.errors import CheckpointError

    base, models = make_family(2)
    parked, dead = _parked_output(tmp_path, base, models)
    rc, _, err = run_cli(["merge", *cli_flags(write_hf_dir(tmp_path / "b", base),
                                                [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]),
                          "-o", tmp_path / "out"], capsys)
    assert rc == 1 and "left the previous output parked in" in err and "mv " in err, err
    assert (parked / "out" / "tiesmerge.json").is_file() and not (tmp_path / "out").exists()

    stats = tmp_path / "stats"
    stats.mkdir()
    write_hf_dir(stats, models[0])
    (stats / "tiesmerge_stats.json").write_text('{"kind": "fisher"}')
    for given in (stats, stats / "model.safetensors"):
        with pytest.raises(CheckpointError, match="is a statistics folder .tiesmerge_stats.json"):
            tiesmerge.merge(base, [given, models[1]], "ties")


def test_a_dry_runs_free_space_counts_the_dead_temporaries_the_write_removes(tmp_path, monkeypatch):
    """hp61a c38: on a nearly full file system holding a dead run's temporary, the dry run refused the output for
    lack of space, and the real run (which removes that temporary first) wrote it."""
    import collections

    from tiesmerge.errors import OutputError
    from tiesmerge.io import writer
    from tiesmerge.scratch import host_tag

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda _: usage(1 << 20, 1 << 20, 8192))
    with pytest.raises(OutputError, match="but only 8.00 KiB is free there"):
        writer.check_free_space(tmp_path / "out", 40000, tmp_path)
    dead = tmp_path / f".tiesmerge-tmp-{host_tag()}-999999-x"  # pid 999999: no such process
    dead.mkdir()
    (dead / writer.OWNED).touch()
    (dead / "model.safetensors").write_bytes(b"\1" * 65536)
    writer.check_free_space(tmp_path / "out", 40000, tmp_path)  # its 64 KiB are freed before the write


def test_a_numpy_array_of_grid_values_is_a_list_of_numbers():
    """hp61b c15b: tune(grid={"density": np.array([0.2]), ...}) was "array([0.2]), not a list" (np.linspace grids)."""
    import numpy as np

    from tiesmerge.tuning import tune

    base, models = make_family(2)

    def score(state):
        return float(sum(v.float().sum() for v in state.values()))

    got = tune(base, models, "ties", score, grid={"density": np.linspace(0.1, 0.2, 2), "lam": np.array([1.0])})
    want = tune(base, models, "ties", score, grid={"density": [0.1, 0.2], "lam": [1.0]})
    assert [p.score for p in got.points] == [p.score for p in want.points] and len(got.points) == 2


def test_pass_62_merge_side(tmp_path):
    """hp62a c21: a dead run's parked previous output whose place had been taken since was deleted by the next write
    beside it, without a word; c31: a dead temporary's hard-linked file was counted as space its removal frees;
    c06: rank=np.int64(1) was "not a positive integer"."""

    import numpy as np

    import tiesmerge
    from tiesmerge.io.writer import OWNED, _stale_bytes, remove_stale
    from tiesmerge.scratch import host_tag

    base, models = make_family(2)
    parked, dead = _parked_output(tmp_path, base, models)
    (tmp_path / "out").mkdir()  # the user's folder, made at that path since
    assert remove_stale(tmp_path) == []
    assert (parked / "out" / "tiesmerge.json").is_file()  # kept, never deleted

    linked = tmp_path / f".tiesmerge-tmp-{host_tag()}-{dead.pid}-lnk"
    linked.mkdir()
    (linked / OWNED).touch()
    (tmp_path / "data.bin").write_bytes(b"\1" * 65536)
    os.link(tmp_path / "data.bin", linked / "data.bin")
    assert _stale_bytes(tmp_path) == 0  # removing the link frees nothing

    lora = write_lora_dir(tmp_path / "l0", random_lora(base, 2, 0), alpha=4)
    lora1 = write_lora_dir(tmp_path / "l1", random_lora(base, 2, 1), alpha=4)
    b = write_hf_dir(tmp_path / "b", base)
    plan = tiesmerge.plan_merge(b, [lora, lora1], "ties", output_format="adapter", rank=np.int64(1))
    assert plan.adapter_output


def _parked_output(tmp_path, base, models):
    """A merged output parked as a --force run killed between its two renames leaves it (named for a dead process),
    its folder and that process."""
    import subprocess
    import sys

    import tiesmerge
    from tiesmerge.io.writer import OWNED
    from tiesmerge.scratch import host_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parked = tmp_path / f".tiesmerge-old-{host_tag()}-{dead.pid}-abc"
    tiesmerge.merge(base, models, "ties", output=parked / "out")
    (parked / OWNED).touch()
    return parked, dead


def test_pass_62_merge_side_messages(tmp_path):
    """hp62a c10: an adapter's weights file in a folder that also holds a full model was told to give that folder,
    which is then refused as ambiguous; c24: an index putting a tensor in the wrong shard was "its shards do not
    hold" with advice to fetch the shards again (they hold it: the index is wrong)."""
    import json
    import shutil

    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.checkpoint import open_checkpoint

    base, models = make_family(2)
    both = write_hf_dir(tmp_path / "both", models[0])
    lora = write_lora_dir(tmp_path / "l0", random_lora(base, 2, 0), alpha=4)
    for f in lora.iterdir():
        shutil.copy(f, both / f.name)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(both / "adapter_model.safetensors")
    assert "also holds a full model" in err.value.hint and "folder of their own" in err.value.hint

    sharded = write_hf_dir(tmp_path / "sharded", models[0], shards=2)
    index = sharded / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    first = sorted(doc["weight_map"])[0]
    held = doc["weight_map"][first]
    other = next(s for s in sorted(set(doc["weight_map"].values())) if s != held)
    doc["weight_map"][first] = other
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(sharded)
    assert f"the index says {other}, it is stored in {held}" in str(err.value)
    assert "regenerate" in err.value.hint and "fetch the shards" not in err.value.hint


def test_pass_62_tune_side_notes(tmp_path, capsys, monkeypatch):
    """hp62b's notes: c19 a search's --dir given as -o was "tiesmerge did not write it"; s05 a statistics output
    written inside another was "files that tiesmerge did not write"; a11 an optimizer weight_decay of 1e300 was
    worded as "not finite numbers with a positive lr"; api a 1-D torch tensor as grid values was refused (numpy's
    were taken); api-seed run_search(seed=2**80) named "--seed"; g6 a grid too large to sweep did not point at
    sampling it."""
    import json

    from safetensors.torch import save_file

    import tiesmerge
    from test_adapt import _data
    from test_hostile_fifth_pass import adapt_checkpoint_of_two_steps
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import parse_grid, tune
    from tiesmerge.tuning.strategies import make_strategy

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    (tmp_path / "ev_dir.py").write_text("def score(state):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, _, err = run_cli(["search", *cli_flags(b, ms), "--evaluator", "ev_dir:score", "--grid", "lam=1",
                          "--grid", "density=0.2", "--dir", tmp_path / "s"], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", tmp_path / "s"], capsys)
    assert rc == 1 and "is a search's folder" in err and "did not write" not in err, err

    merged = tmp_path / "out"
    tiesmerge.merge(base, models, "ties", output=merged)
    tiesmerge.merge(base, models, "ties", output=merged / "inner")
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", merged, "--force"], capsys)
    assert rc == 1 and "inner is another tiesmerge output written inside this one" in err, err
    assert (merged / "inner" / "tiesmerge.json").is_file()

    (tmp_path / "adapt").mkdir()
    abase, fts, kwargs, ck, tensors, meta = adapt_checkpoint_of_two_steps(tmp_path / "adapt")
    groups = json.loads(meta["adam_param_groups"])
    groups[0]["weight_decay"] = 1e300
    meta["adam_param_groups"] = json.dumps(groups)
    save_file(tensors, str(ck), metadata=meta)
    with pytest.raises(ConfigError, match=r"setting 'weight_decay' \(adam_param_groups\) is 1e\+300"):
        tiesmerge.adapt(abase, fts, _data(), "task_arithmetic", steps=4, checkpoint=ck, resume=True, **kwargs)

    def score(state):
        return float(sum(v.float().sum() for v in state.values()))

    got = tune(base, models, "ties", score, grid={"density": torch.tensor([0.1, 0.2]), "lam": torch.tensor([1.0])})
    assert [p.options["density"] for p in got.points] == [0.1, 0.2] and got.points[0].lam == 1.0

    with pytest.raises(ConfigError) as err:
        make_strategy("random", None, budget=3, seed=2**80)
    assert "--seed 1208" not in str(err.value) and "seed=N from Python" in err.value.hint
    with pytest.raises(ConfigError) as err:
        parse_grid("ties", ["density=0.0001:1:0.0001", "lam=0.8:3.0:0.0001"])
    assert "--strategy random" in err.value.hint


def test_pass_62_merge_side_notes(tmp_path, monkeypatch):
    """hp62a c14: a --force over an output on a nearly full file system was told to "free some space", not that the
    output it replaces stays until the new one is complete; c26: a statistics folder as the base was "the model",
    with a hint naming --stats (which analyze lacks)."""
    import collections

    import tiesmerge
    from tiesmerge.errors import CheckpointError, OutputError
    from tiesmerge.io import writer

    base, models = make_family(2)
    tiesmerge.merge(base, models, "ties", output=tmp_path / "out")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda _: usage(1 << 20, 1 << 20, 8192))
    with pytest.raises(OutputError) as err:
        writer.check_free_space(tmp_path / "out", 40000, tmp_path)
    assert "the output it replaces" in err.value.hint and "kept until the new one is complete" in err.value.hint
    with pytest.raises(OutputError) as err:
        writer.check_free_space(tmp_path / "new", 40000, tmp_path)
    assert err.value.hint == "free some space or write elsewhere"
    monkeypatch.undo()

    stats = write_hf_dir(tmp_path / "stats", models[0])
    (stats / "tiesmerge_stats.json").write_text('{"kind": "fisher"}')
    with pytest.raises(CheckpointError, match="the base is a statistics folder") as err:
        tiesmerge.merge(stats, models, "ties")
    assert "--method fisher or regmean with --stats" in err.value.hint


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_in_the_kernels_file_systems_is_refused_before_the_work(tmp_path, capsys):
    """The known-left item of passes 60-62: `-o /proc/x` as root passed os.access's check (root may write anything)
    and was refused only when the output was made, after the whole merge; /sys/fs/cgroup's folders are control
    groups. Refused up front, naming the file system."""
    from tiesmerge.paths import kernel_file_system

    assert kernel_file_system("/proc/self") == "proc" and kernel_file_system(tmp_path) is None
    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    for dry in (["--dry-run"], []):
        rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", "/proc/tiesmerge-test-out", *dry], capsys)
        said = "the kernel's proc file system" if os.geteuid() == 0 else "is not writable"
        assert rc == 1 and said in err and "Traceback" not in err, err
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file

    with pytest.raises(OutputError, match="kernel's proc file system" if os.geteuid() == 0 else "not writable"):
        check_output_file("/proc/tiesmerge-test.json", False, [], "the scores file")  # tune --json, a checkpoint


def test_an_adapt_checkpoints_field_nested_too_deep_is_said_in_words(tmp_path):
    """A known-left item of passes 61-62: an adapt checkpoint whose entropy history was JSON nested 100,000 deep was
    "its fields are missing or damaged: RecursionError: maximum recursion depth exceeded ..."."""
    from safetensors.torch import save_file

    import tiesmerge
    from test_adapt import _data
    from test_hostile_fifth_pass import adapt_checkpoint_of_two_steps
    from tiesmerge.errors import ConfigError

    base, fts, kwargs, ck, tensors, meta = adapt_checkpoint_of_two_steps(tmp_path)
    meta["entropy"] = "[" * 100000 + "]" * 100000
    save_file(tensors, str(ck), metadata=meta)
    with pytest.raises(ConfigError, match="a field holds JSON nested too deep to read") as err:
        tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=4, checkpoint=ck, resume=True, **kwargs)
    assert "RecursionError" not in str(err.value)


def test_pass_63_merge_side(tmp_path, capsys):
    """hp63a c03, c22, c24: DELLA's epsilon, rescale and seed (and breadcrumbs' rescale) at density 1, where nothing is
    drawn, were ignored without a word, from flags and from a mergekit recipe; c04: TSV-M's power_iters and seed
    without a randomized SVD, and a randomized_above no matrix passes, the same; c06: an average that overflowed
    float16 was told to use a smaller lam, which average refuses; c18: a per-model weight in a recipe of a method
    without weights was "unknown option 'weights' (did you mean 'power_iters'?)"; c21: `--exclude ''` (documented
    "empty: none") was refused as empty."""
    import yaml

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    cases = [
        (["--method", "della", "--density", "1", "--epsilon", "0.1", "--rescale", "l1", "--seed", "7"],
         ["epsilon = 0.1 is not used: density 1 drops nothing", "rescale = 'l1' is not used", "seed = 7 is not used"]),
        (["--method", "breadcrumbs", "--density", "1", "--rescale", "l1"], ["rescale = 'l1' is not used"]),
        (["--method", "tsv_m", "--power-iters", "7", "--seed", "9"],
         ["power_iters = 7 is not used: randomized_above 0", "seed = 9 is not used"]),
        (["--method", "tsv_m", "--randomized-above", "100000000"],
         ["randomized_above = 100,000,000 is not used: no matrix it decomposes has more entries"]),
        (["--method", "iso_c", "--exclude", ""], []),
        # hp69a c41: every matrix averaged without a word
        (["--method", "tsv_m", "--rank-fraction", "0.01"],
         ["rank_fraction 0.01 keeps no singular triplet of 6 of the 6 matrices it decomposes (rank 8 or less",
          "rank_fraction 0.125 or more keeps one of each"]),
    ]
    for k, (flags, said) in enumerate(cases):
        rc, _, err = run_cli(["merge", *cli_flags(b, ms), *flags, "-o", tmp_path / f"o{k}"], capsys)
        assert rc == 0 and all(s in err for s in said), (flags, err)
    recipe = tmp_path / "mk_della.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "della", "base_model": str(b), "dtype": "float32",
                                      "models": [{"model": str(m), "parameters": {"density": 1, "epsilon": 0.3,
                                                                                   "weight": 1}} for m in ms]}))
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "mk"], capsys)
    assert rc == 0 and "epsilon = 0.3 is not used" in err and "rescale = " not in err, err  # (never written)
    assert "nothing dropped or rescaled" in (tmp_path / "mk" / "README.md").read_text() + err
    ours = tmp_path / "t.yaml"
    ours.write_text(yaml.safe_dump({"method": "tsv_m", "base": str(b),
                                    "models": [{"path": str(m), "weight": w} for m, w in zip(ms, (2, 1))]}))
    rc, _, err = run_cli(["merge", ours, "-o", tmp_path / "t"], capsys)
    assert rc == 2 and "models[0].weight: tsv_m takes no per-model weight" in err and "power_iters" not in err, err

    half = {n: (v.half() if v.is_floating_point() else v) for n, v in base.items()}
    name = next(n for n, v in half.items() if v.is_floating_point() and v.dim() == 2)
    half[name] = torch.full_like(half[name], 60000.0)
    big = [{**half, name: torch.full_like(half[name], v)} for v in (65000.0, 65504.0)]
    hb = write_hf_dir(tmp_path / "hb", half)
    hms = [write_hf_dir(tmp_path / f"hm{k}", m) for k, m in enumerate(big)]
    rc, _, err = run_cli(["merge", *cli_flags(hb, hms), "--method", "average", "--base-weight", "1", "--weights", "1",
                          "1", "--no-normalize-weights", "--allow-distant", "-o", tmp_path / "ov"], capsys)
    assert rc == 1 and "smaller per-model weights" in err and "lam" not in err.split("hint:")[1], err


@pytest.mark.parametrize("manifest, said", [
    (dict(kind="bogus", examples=3), "not a tiesmerge statistics manifest"),
    (dict(kind="fisher", examples=-1), "field 'examples' is -1, not a count of examples"),
    (dict(kind="fisher", examples="3"), "field 'examples' is '3', not a count of examples"),
    (dict(kind="fisher", examples=3, model_digest=5), "field 'model_digest' is 5, of the wrong type"),
    (dict(kind="fisher", examples=3, options={"x": {1, 2}}), "cannot be written as JSON"),
    (dict(kind="fisher", examples=3, options={"x": float("nan")}), "cannot be written as JSON"),
    (dict(kind="fisher", examples=3), None),  # no tensor
])
def test_statistics_that_would_not_read_back_are_not_written(tmp_path, manifest, said):
    """hp63b c20: save_stats wrote a manifest of kind "bogus", examples -1 or "3", a model_digest 5 or no tensor at all,
    which load_stats and merge --stats then refused in a folder tiesmerge itself wrote; a set in its options was a raw
    TypeError after the folder was begun, a NaN written as bare NaN (no JSON)."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats.files import Statistics, StatsManifest, save_stats

    tensors = {"w": torch.ones(2)} if said else {}
    with pytest.raises(ConfigError, match=said or "hold no tensor"):
        save_stats(tmp_path / "st", Statistics(StatsManifest(**manifest), tensors))
    assert not (tmp_path / "st").exists() and list(tmp_path.iterdir()) == []


def test_pass_63_merge_side_messages(tmp_path, capsys):
    """hp63a c09: an index entry naming a shard in another case was "fetch the missing shard(s) again"; c20: `--base
    B --model M --method slerp` said "merged 2 models"; c31: weights summing to 2e-30 were said to "sum to 0"."""
    import json

    import tiesmerge
    from tiesmerge.errors import CheckpointError, MergeWarning
    from tiesmerge.io.checkpoint import open_checkpoint
    from tiesmerge.methods.task_arithmetic import warn_unnormalised

    base, models = make_family(2)
    sharded = write_hf_dir(tmp_path / "sharded", models[0], shards=2)
    index = sharded / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"] = {k: v.upper().replace(".SAFETENSORS", ".safetensors") if v.startswith("model-00002") else v
                         for k, v in doc["weight_map"].items()}
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="whose name differs from MODEL-00002-OF-00002.safetensors only in case"
                       ) as err:
        open_checkpoint(sharded)
    assert "case-sensitive" in err.value.hint and "fetch" not in err.value.hint

    b = write_hf_dir(tmp_path / "b", base)
    m = write_hf_dir(tmp_path / "m", models[0])
    rc, out, err = run_cli(["merge", "--base", b, "--model", m, "--method", "slerp", "--anchor", "base", "-o",
                            tmp_path / "s"], capsys)
    assert rc == 0 and "merged the base and 1 model with slerp" in out, out + err
    with pytest.warns(MergeWarning, match=r"weights that sum to 2e-30, below mergekit's cut of 1e-8 \(1e-30, 1e-30\)"):
        warn_unnormalised("dare_linear", (1e-30, 1e-30), True)
    assert tiesmerge  # (imported for the family's writers)


def test_pass_63_slerp_and_breadcrumbs(tmp_path, capsys):
    """hp63a c44: slerp between a model and its negation wrote an all-zero model without a word; c52: slerp with
    --layers and no gradient said both "layers is not used" and "set --layers 2"; c53: a second '*' rule was dead
    silently; c47: breadcrumbs at density + gamma past 1 kept 1 - gamma under 'keep' and the density under 'sort'."""
    import tiesmerge
    from tiesmerge.errors import MergeWarning
    from tiesmerge.registry import method_class

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    neg = write_hf_dir(tmp_path / "neg", {k: (-v if v.is_floating_point() else v) for k, v in models[0].items()})
    rc, _, err = run_cli(["merge", "--base", b, "--model", ms[0], "--model", neg, "--method", "slerp", "-o",
                          tmp_path / "z"], capsys)
    assert rc == 0 and "point opposite ways" in err, err
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "--method", "slerp", "--t-by-name", "self_attn=0.5",
                          "--layers", "3", "-o", tmp_path / "l"], capsys)
    assert rc == 0 and "layers = 3 is not used" in err and "--layers 2" not in err, err
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "--method", "slerp", "--t-by-name", "*=0.5;*=0.3", "-o",
                          tmp_path / "s"], capsys)
    assert rc == 0 and "rule 2 ('*') is shadowed by rule 1 ('*')" in err, err

    torch.manual_seed(0)
    zero, one = {"w": torch.zeros(64, 64)}, [{"w": torch.randn(64, 64)}]
    kept = []
    for ties in ("keep", "sort"):
        with pytest.warns(MergeWarning, match=r"density 0.9 \+ gamma 0.5 is past 1"):
            out = tiesmerge.merge(zero, one, method_class("breadcrumbs")(density=0.9, gamma=0.5, threshold_ties=ties))
        kept.append(int((out["w"] != 0).sum()))
    assert abs(kept[0] - kept[1]) <= 2 and abs(kept[0] - 0.9 * 4096) <= 2, kept  # the density, both rules


def test_pass_63_notes(tmp_path, capsys):
    """hp63a c48: a model folder holding a stray adapter_config.json (no adapter weights) was told to move "the
    adapter's files"; c50: a base saved with a rotary inv_freq buffer (older transformers) against fine-tunes without
    it was "tensor names differ ... same base architecture"; c29: analyze at density 1 said "most of a task vector
    sits in its largest entries" and, of 2 models, compared pairs with themselves; hp63b c31: --json (and log=) ending
    in '/' wrote a file; c36: fisher_information returned NaN statistics without a word; c40: float64 statistics past
    float32 were "NaN or Inf"; c34: a label of 10**27 was "no ... integer from 0"."""
    import shutil

    import tiesmerge
    from tiesmerge.adamerging.learn import check_labels
    from tiesmerge.errors import CheckpointError, ConfigError, InvalidTensorError, OutputError
    from tiesmerge.paths import check_output_file
    from tiesmerge.stats import fisher_information
    from tiesmerge.stats.files import Statistics, StatsManifest

    base, models = make_family(2)
    mix = write_hf_dir(tmp_path / "mix", models[0])
    lora = write_lora_dir(tmp_path / "l0", random_lora(base, 2, 0), alpha=4)
    shutil.copy(lora / "adapter_config.json", mix / "adapter_config.json")
    with pytest.raises(CheckpointError, match="without adapter weights") as err:
        tiesmerge.merge(base, [mix, models[1]], "ties")
    assert "move adapter_config.json out of it" in err.value.hint

    inv = "model.layers.0.self_attn.rotary_emb.inv_freq"
    old = {**base, inv: torch.arange(4, dtype=torch.float32)}
    out = tiesmerge.merge(old, models, "ties")
    assert torch.equal(out[inv], old[inv])  # the base's, copied
    assert inv not in tiesmerge.merge(base, [{**m, inv: old[inv]} for m in models], "ties")

    from tiesmerge.analysis.summary import summarise

    text = " ".join(summarise(tiesmerge.analyze(base, models, density=1.0)))
    assert "Density 1 keeps every entry" in text and "sits in its largest entries" not in text
    assert "grow with the number of models" not in text  # two models: the pairs are all of them
    assert "grow with the number of models" in " ".join(summarise(tiesmerge.analyze(base, make_family(3)[1])))

    for bad in ("scores.json/", str(tmp_path / "s.json") + "/"):
        with pytest.raises(OutputError, match="ends with '/', which names a folder"):
            check_output_file(bad, False, [], "--json")

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(InvalidTensorError, match="entries are not finite"):
        fisher_information(module, [{"x": torch.randn(3, 4)}], lambda m, b: m(b["x"]) * float("nan"))

    huge = Statistics(StatsManifest("fisher", 3), {n: torch.full(v.shape, 1e300, dtype=torch.float64)
                                                   for n, v in base.items() if v.is_floating_point()})
    with pytest.raises(InvalidTensorError, match="holds values past float32's range"):
        tiesmerge.merge(base, models, "fisher", stats=[huge, huge])

    with pytest.raises(ConfigError, match=r"'label' 1000000000000000000000000000 is past any class index"):
        check_labels({"t": [{"text": "a", "label": 10**27}]})
    assert capsys is not None


def test_pass_64_statistics_api(tmp_path):
    """hp64b c07: fisher's epsilon of 1e-50 (0 in float32) made entries 0 / 0, said as an overflow with advice about a
    lam; c18: gram_matrices on a Linear called by keyword was a bare IndexError; c19: an empty batch among others was
    a bare IndexError under vmap; c20: gram_matrices of a module that is itself a Linear keyed it '.weight'; c21: one
    class was said to be detached logits."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.registry import make_method
    from tiesmerge.stats import fisher_information, gram_matrices

    with pytest.raises(ConfigError, match="epsilon must be at least 1.18e-38"):
        make_method("fisher", {"epsilon": 1e-50})

    class ByKeyword(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.l(input=x)

    torch.manual_seed(0)
    assert list(gram_matrices(ByKeyword(), [torch.randn(5, 4)], lambda m, b: m(b)).tensors) == ["l.weight"]
    assert list(gram_matrices(torch.nn.Linear(4, 3), [torch.randn(5, 4)], lambda m, b: m(b)).tensors) == ["weight"]
    stats = fisher_information(ByKeyword(), [torch.randn(0, 4), torch.randn(3, 4)], lambda m, b: m(b))
    assert stats.manifest.examples == 3
    with pytest.raises(ConfigError, match="every class has the same logit"):
        fisher_information(torch.nn.Linear(4, 1), [torch.randn(5, 4)], lambda m, b: m(b))


def test_exact_numbers_are_option_values(tmp_path):
    """hp64a c53: density=Fraction(1, 3) (or Decimal("0.3")) was "density must be a fraction in (0, 1], got
    Fraction(1, 3)", the same for densities, drop_rate, rank_fraction and gamma."""
    from decimal import Decimal
    from fractions import Fraction

    from tiesmerge.registry import make_method

    assert make_method("ties", {"density": Fraction(1, 3)}).density == pytest.approx(1 / 3)
    assert make_method("ties", {"densities": [Fraction(1, 3), Decimal("0.5")]}).densities == (pytest.approx(1 / 3),
                                                                                              0.5)
    assert make_method("dare_ties", {"drop_rate": Decimal("0.9")}).drop_rate == 0.9
    assert make_method("breadcrumbs", {"gamma": Fraction(1, 100)}).gamma == 0.01


def test_a_model_tying_its_head_beside_an_untied_base_is_named(tmp_path):
    """hp64a c19: following the hint to use an untied base, a tied model among the inputs was "lacks lm_head.weight
    ... all models must be fine-tunes of the same base architecture"."""
    import tiesmerge
    from tiesmerge.errors import IncompatibleCheckpointsError

    base, models = make_family(2)
    tied = {n: v for n, v in models[0].items() if n != "lm_head.weight"}
    with pytest.raises(IncompatibleCheckpointsError) as err:
        tiesmerge.merge(base, [tied, models[1]], "ties")
    assert "ties its head to its input embedding" in err.value.hint


def test_statistics_saved_from_another_working_folder_are_not_refused(tmp_path, monkeypatch):
    """hp64b c30: statistics whose manifest names the model relative to the folder they were computed in ("fx/a")
    were refused by save() from another working folder: "the output contains the model ... (fx/a)", resolved there."""
    from tiesmerge.errors import OutputError
    from tiesmerge.stats.files import Statistics, StatsManifest, save_stats

    stats = Statistics(StatsManifest("fisher", 3, model="fx/a"), {"w": torch.ones(2)})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    save_stats(tmp_path / "elsewhere" / "st", stats)  # fx/a names nothing here
    assert (tmp_path / "elsewhere" / "st" / "tiesmerge_stats.json").is_file()
    (tmp_path / "elsewhere" / "fx" / "a").mkdir(parents=True)  # a folder of that name here is still guarded
    with pytest.raises(OutputError, match="the model these statistics describe"):
        save_stats(tmp_path / "elsewhere" / "fx", stats)


def test_a_merge_refused_midway_closes_its_output_file(tmp_path):
    """hp64b c06: every refusal met mid-merge (regmean's statistics checked as they are read) left the output's
    open shard to the garbage collector: a ResourceWarning of an unclosed file."""
    import gc
    import warnings

    import tiesmerge
    from tiesmerge.errors import InvalidTensorError
    from tiesmerge.stats.files import Statistics, StatsManifest

    base, models = make_family(2)
    grams = {k: torch.eye(v.shape[1]) for k, v in base.items() if v.is_floating_point() and v.dim() == 2}
    grams[list(grams)[-1]] = -grams[list(grams)[-1]]  # refused when its tensor is read: after others were written
    stats = [Statistics(StatsManifest("gram", 3), grams)] * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InvalidTensorError):
            tiesmerge.merge(base, models, "regmean", stats=stats, output=tmp_path / "out")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    assert not (tmp_path / "out").exists()


def test_validate_lists_a_missing_base_once_with_the_recipes_hint(tmp_path, capsys, monkeypatch):
    """hp64a c62: validate of a mergekit recipe whose ../ paths miss from this folder listed the base twice ("cannot
    read the model", "cannot read the base") with a generic hint, where merge names the working folder."""
    (tmp_path / "y").mkdir()
    recipe = tmp_path / "y" / "mk.yaml"
    recipe.write_text("merge_method: ties\nbase_model: ../base\nmodels:\n  - model: ../a\n    parameters: {weight: 1, "
                      "density: 0.5}\n  - model: ../b\n    parameters: {weight: 1, density: 0.5}\n")
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc != 0 and err.count("../base: no such file") == 1 and "relative to the working folder" in err, err


def test_pass_65_statistics_api():
    """hp65b c08: a token_mask returning a list was an AttributeError; c09: tensors of different batch sizes a bare
    ValueError; c10: a batch carrying texts under vmap torch's bare ValueError; c11: 2 labels for 6 examples a bare
    error, or under kind='batched' a silently wrong Fisher."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats import fisher_information, gram_matrices

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x = torch.randn(6, 4)
    with pytest.raises(ConfigError, match="token_mask\\(batch\\) returned a list"):
        gram_matrices(module, [{"x": x}], lambda m, b: m(b["x"]), token_mask=lambda b: [True] * 6)
    with pytest.raises(ConfigError, match="batch dimensions \\[2, 6\\]"):
        gram_matrices(module, [{"x": x, "y": torch.zeros(2)}], lambda m, b: m(b["x"]))
    with pytest.raises(ConfigError, match="cannot run under torch.func.vmap"):
        fisher_information(module, [{"x": x, "text": ["a"] * 6}], lambda m, b: m(b["x"]))
    for kind in ("empirical", "batched"):
        with pytest.raises(ConfigError, match="labels of shape \\(2,\\) for a batch of 6"):
            fisher_information(module, [{"x": x}], lambda m, b: m(b["x"]), kind=kind,
                               targets=lambda b: torch.tensor([0, 1]))


def test_an_input_renamed_over_during_the_merge_is_refused(tmp_path, monkeypatch):
    """hp65a c43, c47: a model's weights file replaced by a rename while the merge ran: the merge read the old file,
    the manifest recorded the new one's digest, and a false "the same files as model 0" warning followed."""
    import shutil

    import tiesmerge
    import tiesmerge.api as api
    from tiesmerge.errors import CheckpointError

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    from tiesmerge.io.card import _digest

    done = []

    class Late:  # a digest still being worked out when the merge ends: the file is renamed over before it is read
        def __init__(self, path):
            self.path = path

        def result(self):
            if not done and self.path.parent == ms[1]:
                shutil.copy(ms[0] / "model.safetensors", tmp_path / "swap.safetensors")
                os.replace(tmp_path / "swap.safetensors", ms[1] / "model.safetensors")
                done.append(1)
            return _digest(self.path)

    monkeypatch.setattr(api, "hash_files", lambda paths, pool: [Late(p) for p in paths])
    with pytest.raises(CheckpointError, match="was replaced by another file while tiesmerge read it"):
        tiesmerge.merge(b, ms, "ties", output=tmp_path / "out")
    assert done and not (tmp_path / "out").exists()


def test_statistics_of_a_submodule_are_named_as_such():
    """hp65b c18: Fisher statistics computed on a submodule (names without the model's prefix) were refused with "must
    be computed with the model they are given for", though they were."""
    import tiesmerge
    from tiesmerge.errors import IncompatibleCheckpointsError
    from tiesmerge.stats.files import Statistics, StatsManifest

    base, models = make_family(2)
    inner = {n.removeprefix("model."): torch.ones(v.shape) for n, v in base.items()
             if v.is_floating_point() and n.startswith("model.")}
    stats = [Statistics(StatsManifest("fisher", 3), inner)] * 2
    with pytest.raises(IncompatibleCheckpointsError) as err:
        tiesmerge.merge(base, models, "fisher", stats=stats)
    assert "computed on a submodule (their names lack the prefix 'model.')" in err.value.hint


def test_analyze_takes_exact_and_numpy_numbers_and_refuses_booleans():
    """hp66a c22: analyze(density=Fraction(1, 5)) (or Decimal, np.float32) was "must be a fraction in (0, 1], got
    Fraction(1, 5)", where merge takes them; c23: density=True, curve=[True, 0.5], subsets_per_size=True or 2.5 were
    accepted and written into the report."""
    from decimal import Decimal
    from fractions import Fraction

    import numpy as np

    import tiesmerge
    from tiesmerge.errors import ConfigError

    base, models = make_family(2)
    for density in (Fraction(1, 5), Decimal("0.2"), np.float32(0.2)):
        assert tiesmerge.analyze(base, models, density=density)["settings"]["density"] == 0.2
    for kwargs in (dict(density=True), dict(curve=[True, 0.5]), dict(subsets_per_size=True),
                   dict(subsets_per_size=2.5)):
        with pytest.raises(ConfigError):
            tiesmerge.analyze(base, models, **kwargs)



def test_analyze_curve_is_capped_and_its_bad_value_named():
    """hp67a c72: analyze(curve=100,000 densities) ran 55 s (linear in its length, no cap): the curve takes at most
    1,000 distinct densities (read from 2^16-bin histograms, more add no detail); a bad value is named alone, not the
    whole curve."""
    import numpy as np

    import tiesmerge
    from tiesmerge.errors import ConfigError

    base, models = make_family(2)
    curve = [float(k) for k in np.linspace(0.001, 1, 1001)]
    with pytest.raises(ConfigError, match="curve holds 1,001 densities; at most 1,000"):
        tiesmerge.analyze(base, models, curve=curve)
    with pytest.raises(ConfigError, match=r"got 1\.5\n"):
        tiesmerge.analyze(base, models, curve=[*curve[:999], 1.5])
    report = tiesmerge.analyze(base, models, curve=curve[:1000] + curve[:5])  # repeats: 1,000 distinct
    assert len(report["redundancy"]["densities"]) == 1000

def test_a_stop_during_the_outputs_swap_is_delivered_after_it(tmp_path, capsys, monkeypatch):
    """hp66a c14-c16, c32: a SIGTERM the instant the output was renamed into place exited 143 with "no output
    directory was left behind" beside a complete output; with --force it left half of the replaced output parked for
    good, which no later run removed."""
    import signal

    from tiesmerge.io import writer
    from tiesmerge.io.writer import OWNED, remove_stale

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    argv = ["merge", *cli_flags(b, ms), "-o", tmp_path / "out"]
    assert run_cli(argv, capsys)[0] == 0
    real = os.replace

    def replace_then_stop(src, dst):
        real(src, dst)
        if str(dst) == str(tmp_path / "out") and ".tiesmerge-tmp-" in str(src):
            signal.raise_signal(signal.SIGTERM)  # the new output just in place, the old one still parked

    monkeypatch.setattr(writer.os, "replace", replace_then_stop)
    rc, _, err = run_cli([*argv, "--force"], capsys)
    monkeypatch.setattr(writer.os, "replace", real)
    assert rc == 143 and "was complete before the stop and is kept" in err, err
    assert (tmp_path / "out" / "tiesmerge.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiesmerge-")], list(tmp_path.iterdir())

    # a dead run's parked fragment beside a newer output of tiesmerge's is what its --force replaced: removed
    parked, dead = _parked_output(tmp_path / "x", base, models)
    (parked.parent / "out").mkdir()
    (parked.parent / "out" / "tiesmerge.json").write_text((tmp_path / "out" / "tiesmerge.json").read_text())
    assert remove_stale(parked.parent) == [parked.name] and not parked.exists()
    assert OWNED


def test_validate_of_a_mergekit_slerp_listing_its_base_names_only_the_real_problem(tmp_path, capsys):
    """hp66a c19: a mergekit slerp recipe listing base_model among its models (its usual form) with one bad parameter
    was also told "model 0 (...base) is the base itself", advice that would break the slerp."""
    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    m = write_hf_dir(tmp_path / "m", models[0])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {m}\n"
                      "parameters:\n  t: 0.5\n  foo: 1\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc != 0 and "foo" in err and "is the base itself" not in err, err


def test_pass_67_statistics_api():
    """hp67b c16-c19: targets giving a list or a numpy array failed under vmap and the batched path (the loop path
    took them), complex labels were torch's bare error; c29: a token_mask fitting no Linear input was ignored."""
    import numpy as np

    from tiesmerge.errors import ConfigError
    from tiesmerge.stats import fisher_information, gram_matrices

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x = torch.randn(6, 4)
    labels = [0, 1, 2, 0, 1, 2]
    want = fisher_information(module, [x], lambda m, b: m(b), kind="empirical", targets=lambda b: torch.tensor(labels))
    for given in (labels, np.array(labels)):
        for kind in ("empirical", "batched"):
            got = fisher_information(module, [x], lambda m, b: m(b), kind=kind, targets=lambda b, g=given: g)
            if kind == "empirical":
                assert all(torch.allclose(got.tensors[k], want.tensors[k]) for k in want.tensors)
    with pytest.raises(ConfigError, match="integer tensor of class labels"):
        fisher_information(module, [x], lambda m, b: m(b), kind="empirical",
                           targets=lambda b: torch.zeros(6, dtype=torch.complex64))
    with pytest.raises(ConfigError, match="fits no Linear layer's input"):
        gram_matrices(module, [x.reshape(2, 3, 4)], lambda m, b: m(b), token_mask=lambda b: torch.ones(3, 2).bool())


def test_a_stop_during_a_force_merge_says_the_existing_output_is_unchanged(tmp_path, capsys, monkeypatch):
    """hp67a c32: a SIGTERM during `merge -o OUT --force` over an earlier output said "no output directory was left
    behind" while OUT (the earlier output, rightly kept) was there."""
    import signal

    import tiesmerge.api as api

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    argv = ["merge", *cli_flags(b, ms), "-o", tmp_path / "out"]
    assert run_cli(argv, capsys)[0] == 0

    def stop(paths, pool):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(api, "hash_files", stop)
    rc, _, err = run_cli([*argv, "--force"], capsys)
    assert rc == 143 and "nothing new was written, and the existing output" in err and "is unchanged" in err, err
    assert (tmp_path / "out" / "tiesmerge.json").is_file()


def test_a_stop_during_any_force_command_says_the_existing_output_is_unchanged(tmp_path, capsys, monkeypatch):
    """hp68a c12, c61, c67: the wording of hp67a c32 was set by merge only, after its imports: a stop while a merge
    read its recipe, or during analyze --force, said "no output directory was left behind" beside the earlier output;
    a stop after analyze --method's compared merge said that private folder (deleted) "was complete and is kept"."""
    import signal

    import tiesmerge.analysis
    import tiesmerge.cli.commands as commands

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    argv = ["merge", *cli_flags(b, ms), "-o", tmp_path / "out"]
    analyze = ["analyze", *cli_flags(b, ms), "-o", tmp_path / "an", "--method", "ties"]
    assert run_cli(argv, capsys)[0] == 0 and run_cli(analyze, capsys)[0] == 0

    def stop(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(commands, "recipe_from_dict", stop)  # the merge's first steps, before any import of its own
        rc, _, err = run_cli([*argv, "--force"], capsys)
    assert rc == 143 and f"nothing new was written, and the existing output {tmp_path / 'out'} is unchanged" in err
    monkeypatch.setattr(tiesmerge.analysis, "run_analysis", stop)  # after the compared merge was placed
    rc, _, err = run_cli([*analyze, "--force"], capsys)
    assert rc == 143 and f"the existing output {tmp_path / 'an'} is unchanged" in err and "tiesmerge-analyze" not \
        in err, err
    assert (tmp_path / "an" / "analysis.json").is_file()


def test_a_killed_analyzes_compared_merges_are_removed_by_the_next_run(tmp_path, monkeypatch):
    """hp68a c60: analyze --method's compared merges lay in a tempfile.TemporaryDirectory, which a SIGKILL left in
    /tmp for good (whole float32 models). They lie in a private folder a later run removes once its process is dead."""
    import subprocess
    import sys
    import tempfile

    import tiesmerge
    from tiesmerge.scratch import MARK, host_tag

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f"tiesmerge-analyze-{host_tag()}-{dead.stdout.strip()}-x1"
    (left / "m0").mkdir(parents=True)
    (left / MARK).touch()
    (left / "m0" / "model.safetensors").write_bytes(b"a killed run's merge")
    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    tiesmerge.analyze(b, ms, methods=["ties"])
    assert not left.exists()
    assert not list(tmp_path.glob("tiesmerge-analyze-*"))  # its own removed at the end


def test_force_over_an_output_whose_stamps_were_removed_says_the_manifest_is_damaged(tmp_path, capsys):
    """hp69a c34, c38: the manifest's written_stamps removed made --force say "5 of another size" of files nobody had
    touched."""
    import json

    b, ms, out = _merged_output(tmp_path, capsys)
    marker = json.loads((out / "tiesmerge.json").read_text())
    del marker["written_stamps"]
    (out / "tiesmerge.json").write_text(json.dumps(marker))
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", out, "--force"], capsys)
    assert rc != 0 and "has no 'written_stamps' (their sizes and times: removed)" in err and "the manifest is " \
        "damaged" in err and "of another size" not in err, err


@pytest.mark.parametrize("where", ["hash", "write"])
def test_numbas_cache_failing_to_write_is_said_as_such(tmp_path, capsys, monkeypatch, where):
    """hp69b c04: numba's first compile saves its kernel cache; under a full disk or `ulimit -f` its OSError (no file
    named) was said as "cannot write to standard output ... redirect it elsewhere" (stdout at /dev/null), or, inside
    the output's writing, blamed on the output's newest file (.tiesmerge-temporary)."""
    import importlib.util

    import tiesmerge.api as api
    from tiesmerge.io import writer

    fake = tmp_path / "site" / "numba" / "core" / "caching.py"  # a frame of numba's, as its cache raises
    fake.parent.mkdir(parents=True)
    fake.write_text("import errno\ndef save(*args, **kwargs):\n    raise OSError(errno.EFBIG, 'File too large')\n")
    spec = importlib.util.spec_from_file_location("fake_numba_caching", fake)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    monkeypatch.setattr(api if where == "hash" else writer.SafetensorsStreamWriter,
                        "hash_files" if where == "hash" else "write", module.save)
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", tmp_path / "out"], capsys)
    assert rc == 1 and "numba could not save its cache of the kernels it compiled (File too large)" in err, err
    assert "standard output" not in err and ".tiesmerge-temporary" not in err
    assert not (tmp_path / "out").exists()
    # hp71b c24: a cache file numba cannot read back was "an unexpected UnpicklingError ... a bug in tiesmerge"
    damaged = tmp_path / "site2" / "numba" / "core" / "caching.py"
    damaged.parent.mkdir(parents=True)
    damaged.write_text("import pickle\ndef load(*args, **kwargs):\n    raise pickle.UnpicklingError('truncated')\n")
    spec = importlib.util.spec_from_file_location("fake_numba_caching_load", damaged)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(api if where == "hash" else writer.SafetensorsStreamWriter,
                        "hash_files" if where == "hash" else "write", module.load)
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", tmp_path / "out"], capsys)
    assert rc == 1 and "numba's cache of the kernels it compiled is damaged (UnpicklingError: truncated)" in err, err
    assert "bug" not in err and not (tmp_path / "out").exists()


def test_a_library_cache_folder_set_inside_the_output_is_not_used(tmp_path, monkeypatch):
    """hp70b c33, c42: NUMBA_CACHE_DIR (or MPLCONFIGDIR) set to the output folder had numba (or matplotlib) write its
    cache there during the run, and the finished output was refused as holding files tiesmerge did not write. Such a
    folder is said, and a private one used for the run; one elsewhere is the user's to keep."""
    import os

    from tiesmerge.engine import numba_cache
    from tiesmerge.errors import MergeWarning
    from tiesmerge.io.card import digest_cache_kept_out_of
    from tiesmerge.scratch import private_folder_for

    out = tmp_path / "out"
    with digest_cache_kept_out_of([out]):
        monkeypatch.setenv("NUMBA_CACHE_DIR", str(out / "numba"))
        with pytest.warns(MergeWarning, match=r"NUMBA_CACHE_DIR=.*out/numba lies in this command's inputs or output"):
            numba_cache.place()
        assert not os.environ["NUMBA_CACHE_DIR"].startswith(str(out))
        monkeypatch.setenv("MPLCONFIGDIR", str(out))
        with pytest.warns(MergeWarning, match="MPLCONFIGDIR="):
            private_folder_for("MPLCONFIGDIR", "tiesmerge-matplotlib-")
        assert os.environ["MPLCONFIGDIR"] != str(out)
        monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mine"))
        private_folder_for("MPLCONFIGDIR", "tiesmerge-matplotlib-")
        assert os.environ["MPLCONFIGDIR"] == str(tmp_path / "mine")
