"""Issue 13, the fourteenth independent hostile pass: one case per finding (and the ninth pass's notes left open)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers_ckpt import make_family, write_hf_dir


@pytest.fixture
def family(tmp_path):
    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    return b, ms


def test_a_pipe_reached_through_links_is_called_a_pipe(family, tmp_path):
    """Pass 9's note: `--base /dev/stdin` on a pipe said "a link to /proc/self/fd/0, which does not exist"."""
    b, ms = family
    (tmp_path / "chain").symlink_to("/dev/stdin")  # chain -> /dev/stdin -> /proc/self/fd/0 -> pipe:[N]
    done = subprocess.run([sys.executable, "-m", "tiesmerge.cli.main", "merge", "--base", str(tmp_path / "chain"),
                           "--model", str(ms[0]), "--model", str(ms[1]), "-o", str(tmp_path / "out")],
                          input="x", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "is a pipe (pipe:[" in done.stderr and "does not exist" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
