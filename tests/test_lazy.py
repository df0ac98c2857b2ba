"""Modules imported on first use (lazy.py): the proxy imports its module at the first attribute
read, not before, and then reads through to it. Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from tiesmerge.lazy import LazyModule, torch
    report = {"torch_at_start": "torch" in sys.modules}
    probe = LazyModule("lazy_probe")
    report["probe_before"] = "lazy_probe" in sys.modules
    report["value"] = probe.VALUE  # the first attribute read imports it
    report["probe_after"] = "lazy_probe" in sys.modules
    sys.modules["lazy_probe"].LATE = "added later"
    report["late"] = probe.LATE  # what the module gains afterwards still comes through
    try:
        probe.MISSING
    except AttributeError as exc:
        report["missing"] = str(exc)
    report["torch_before_use"] = "torch" in sys.modules
    report["zeros"] = list(torch.zeros(2, 3).shape)
    report["torch_after_use"] = "torch" in sys.modules and torch.float32 is sys.modules["torch"].float32
    print(json.dumps(report))
""")


def test_the_proxy_imports_on_first_attribute_access(tmp_path):
    (tmp_path / "lazy_probe.py").write_text("VALUE = 42\n")
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True,
                          env={"PATH": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "torch_at_start": False, "probe_before": False, "value": 42, "probe_after": True, "late": "added later",
        "missing": "module 'lazy_probe' has no attribute 'MISSING'", "torch_before_use": False, "zeros": [2, 3],
        "torch_after_use": True,
    }
