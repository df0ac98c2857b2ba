"""`tiesmerge demo --synthetic` (cli/demo.py) runs end to end on a tiny model and prints its table."""

from __future__ import annotations

from tiesmerge.cli.main import main


def test_demo_prints_a_table(tmp_path, capsys):
    assert main(["demo", "--synthetic", "--workdir", str(tmp_path / "demo"), "--params", "3"]) == 0
    out = capsys.readouterr().out
    for row in ("ties", "task_arithmetic", "average", "skill kept"):
        assert row in out
    ties_row = next(line for line in out.splitlines() if line.startswith("ties  ("))
    ta_row = next(line for line in out.splitlines() if line.startswith("task_arithmetic ("))
    # TIES keeps more of each task's skill than task arithmetic at lam 0.4 (the demo's point)
    assert float(ties_row.split()[-2]) > float(ta_row.split()[-2])
    assert (tmp_path / "demo" / "merged-ties" / "tiesmerge.json").is_file()
