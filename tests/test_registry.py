"""The method table (registry.py): the built-in methods by name; methods of other packages found
through entry points, read afresh, and refused with an error naming the entry point when broken,
clashing or misnamed; method configs built from names and options, with suggestions."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tiesmerge
from helpers_merge import grid_family, run
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Ties
from tiesmerge.registry import (
    BUILTIN,
    ENTRY_POINT_GROUP,
    METHODS,
    broken_plugins,
    did_you_mean,
    make_method,
    method_class,
)

PLUGIN = '''
from typing import ClassVar

from tiesmerge.methods import Requirements, finite, method_config, option


@method_config
class Scaled:
    """The models' task vectors summed, times ``factor``."""

    name: ClassVar[str] = "scaled_sum"
    paper: ClassVar[str] = "https://example.org/scaled"
    summary: ClassVar[str] = "task vectors summed and scaled"

    factor: float = option(0.5, "scale of the sum", check=finite)

    def requirements(self):
        return Requirements()

    def merge(self, tau, ctx):
        return tau.sum(0) * self.factor


@method_config
class FakeTies:
    name: ClassVar[str] = "ties"
    paper: ClassVar[str] = "https://example.org/fake"
    summary: ClassVar[str] = "not the real one"

    def requirements(self):
        return Requirements()

    def merge(self, tau, ctx):
        return tau[0]


@method_config
class Untyped:
    name: ClassVar[str] = "untyped"
    paper: ClassVar[str] = "https://example.org/untyped"
    summary: ClassVar[str] = "an option the CLI cannot parse"

    table: dict = option(None, "a mapping")

    def requirements(self):
        return Requirements()

    def merge(self, tau, ctx):
        return tau[0]


class NotADataclass:
    name = "plain"
    paper = summary = "x"

    def requirements(self):
        return Requirements()

    def merge(self, tau, ctx):
        return tau[0]


def helper():
    return None
'''


@pytest.fixture()
def install(tmp_path, monkeypatch):
    """Put a module and a distribution declaring entry points of the method group on sys.path,
    as `pip install` of a plugin package would; the modules are forgotten afterwards."""
    modules = []

    def put(module: str, entries: dict[str, str], source: str = PLUGIN) -> Path:
        site = tmp_path / f"site-{module}"
        site.mkdir()
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{module}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
        monkeypatch.syspath_prepend(str(site))
        modules.append(module)
        return site

    yield put
    for module in modules:
        sys.modules.pop(module, None)


def test_registry_names_build_the_same_methods() -> None:
    assert tiesmerge.METHODS["ties"] is Ties
    base, models = grid_family(14, 2)
    a = run(base, models, "ties", density=0.4, lam=1.1)
    b = run(base, models, Ties(density=0.4, lam=1.1))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_builtin_methods_by_name() -> None:
    assert list(METHODS) == [cls.name for cls in BUILTIN] and len(METHODS) == len(BUILTIN)
    assert all(METHODS[cls.name] is cls and method_class(cls.name) is cls for cls in BUILTIN)
    assert "ties" in METHODS and "tie" not in METHODS and 3 not in METHODS
    assert repr(METHODS).startswith("METHODS(ties, task_arithmetic, ")


def test_a_plugin_is_seen_through_the_table_and_merges(install) -> None:
    site = install("scaled_plugin", {"scaled_sum": "scaled_plugin:Scaled"})
    assert "scaled_sum" in METHODS and list(METHODS)[-1] == "scaled_sum"  # after the built-ins
    cls = METHODS["scaled_sum"]
    assert cls.__module__ == "scaled_plugin" and method_class("scaled_sum") is cls
    assert make_method("scaled_sum", {"factor": 2.0}) == cls(factor=2.0)
    base = {"w": torch.zeros(3)}
    models = [{"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([0.5, 0.5, -1.0])}]
    merged = tiesmerge.merge(base, models, "scaled_sum", factor=2.0)
    assert torch.equal(merged["w"], torch.tensor([3.0, 5.0, 4.0]))
    sys.path.remove(str(site))  # uninstalled: the table is read afresh
    assert "scaled_sum" not in METHODS


@pytest.mark.parametrize(
    ("entries", "source", "message"),
    [
        ({"gone": "no_such_module_here:Gone"}, None,
         "entry point gone = no_such_module_here:Gone (group tiesmerge.methods): "
         "cannot be loaded (ModuleNotFoundError"),
        ({"boom": "boom_plugin:Scaled"}, "raise RuntimeError('boom at import')\n",
         "entry point boom = boom_plugin:Scaled (group tiesmerge.methods): "
         "cannot be loaded (RuntimeError: boom at import)"),
        ({"missing": "boom_plugin:Missing"}, None,
         "entry point missing = boom_plugin:Missing (group tiesmerge.methods): cannot be loaded (AttributeError"),
    ],
)
def test_a_broken_plugin_names_its_entry_point(install, entries, source, message) -> None:
    install("boom_plugin", entries, source or PLUGIN)
    (name,) = entries
    with pytest.raises(ConfigError) as info:
        method_class(name)  # asked for by name: the reason
    assert str(info.value).startswith(message)
    assert info.value.hint == "fix or uninstall the package that declares it"
    with pytest.raises(ConfigError):
        METHODS[name]
    # set aside: every other method still works, and the table does not list it
    assert METHODS["ties"] is Ties and name not in METHODS and name not in list(METHODS)
    assert str(broken_plugins()[name]).startswith(message)


def test_a_plugin_named_like_a_builtin_is_set_aside_and_the_builtin_runs(install) -> None:
    """One third-party package claiming 'ties' must not disable the default method for every command (hostile
    pass 8, F22): the built-in runs, with a warning naming the plugin, which is listed as not available."""
    from tiesmerge.errors import MergeWarning

    install("clash_plugin", {"ties": "clash_plugin:FakeTies"})
    with pytest.warns(MergeWarning, match=r"the built-in method 'ties' runs; an installed plugin's entry point ties = "
                                          r"clash_plugin:FakeTies \(group tiesmerge.methods\): a method named 'ties' "
                                          r"exists already"):
        assert method_class("ties") is Ties
    assert METHODS["ties"] is Ties and "ties" in METHODS and METHODS["task_arithmetic"]
    assert "exists already" in str(broken_plugins()["ties"])


def test_the_entry_point_name_must_be_the_methods_name(install) -> None:
    install("misnamed_plugin", {"scaled": "misnamed_plugin:Scaled"})
    with pytest.raises(ConfigError, match="entry point scaled = misnamed_plugin:Scaled .*: the entry point's name "
                                          "must be the method's name 'scaled_sum'"):
        method_class("scaled")
    assert "scaled" not in METHODS and "scaled_sum" not in METHODS


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("helper", r"is not a merge method \(it lacks name, paper, summary, requirements, merge\)"),
        ("NotADataclass", r"is not a merge method \(not a dataclass\)"),
        ("Untyped", r"Untyped.table: options are float, int, str, bool, ModelPath"),
    ],
)
def test_a_plugin_that_is_not_a_method_is_refused(install, entry: str, message: str) -> None:
    install("odd_plugin", {"odd": f"odd_plugin:{entry}"})
    with pytest.raises(ConfigError, match=rf"entry point odd = odd_plugin:{entry} .*{message}"):
        method_class("odd")
    assert len(METHODS) == len(BUILTIN)


def test_make_method_reports_every_unknown_option_with_suggestions() -> None:
    with pytest.raises(ConfigError) as info:
        make_method("ties", {"densty": 0.2, "lamda": 1.0, "zzz": 1, "scope": "per_tensor"})
    assert info.value.problems == ["ties: unknown option 'densty' (did you mean 'density'?)",
                                   "ties: unknown option 'lamda' (did you mean 'lam'?)",
                                   "ties: unknown option 'zzz'"]
    assert info.value.hint.startswith("ties takes: density, lam, scope, elect")
    assert make_method("ties", {"density": 0.3}) == Ties(density=0.3) and make_method("ties") == Ties()


def test_unknown_method_names_suggest_and_list() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'tie' \(did you mean 'ties'\?\)") as info:
        make_method("tie")
    assert info.value.hint.startswith("available methods: ties, task_arithmetic, ")
    with pytest.raises(ConfigError) as info:
        method_class(3)  # type: ignore[arg-type]
    assert info.value.message == "unknown method 3"
    assert did_you_mean("xyz", ["ties", "average"]) == ""
    # another case or a dash for the underscore (hp61: `--method TIES` had no suggestion)
    assert did_you_mean("TIES", ["ties", "average"]) == " (did you mean 'ties'?)"
    assert did_you_mean("Task-Arithmetic", ["ties", "task_arithmetic"]) == " (did you mean 'task_arithmetic'?)"


def test_the_methods_command_lists_the_rest_and_warns_of_a_broken_plugin(install, capsys) -> None:
    from tiesmerge.cli.main import main

    install("boom_plugin", {"boom": "boom_plugin:Scaled"}, "raise RuntimeError('boom at import')\n")
    assert main(["methods"]) == 0
    out, err = capsys.readouterr()
    assert "ties  —" in out and "boom" not in out
    assert "warning: method 'boom' is not available: entry point boom = boom_plugin:Scaled" in err
    assert main(["merge", "--method", "boom", "--base", "b", "--model", "m", "-o", "o"]) == 2
    assert "RuntimeError: boom at import" in capsys.readouterr().err
