"""Hostile pass 84 (and the notes of earlier passes it re-tried): what a careless user's inputs still got wrong."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("argv", [["merge", "--base", "b", "--model", "m", "-o", "-"],
                                  ["tune", "--base", "b", "--model", "m", "--evaluator", "e:f", "--json", "-"]])
def test_a_dash_as_a_written_path_is_refused_not_made_a_folder(tmp_path, capsys, monkeypatch, argv):
    """81a c46: `-o -` made a folder named '-' (the usual word for standard output, which nothing writes to)."""
    from helpers_ckpt import run_cli

    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and "named '-'" in err and "standard output" in err and "./-" in err, err
    assert list(tmp_path.iterdir()) == []
