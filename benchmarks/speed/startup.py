"""Start-up: how long `tiesmerge` takes to answer when it does no tensor math, side by side with the
interpreter's floors (a bare `python`, `import numpy`, `import torch`) in one run.

    python benchmarks/speed/startup.py [--runs 7] [--out benchmarks/results]

Each command runs as a fresh process (`python -c` calling the CLI's `main`, as the console script
does), `--runs` times, interleaved so that background load spreads over all of them; the table
gives min / median / max seconds and which heavy modules the process loaded. The models are tiny
(a few KiB): what is measured is start-up, not reading.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

PROBE = """
import sys
from tiesmerge.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numba", "transformers", "scipy"})
print("HEAVY", ",".join(heavy) or "-", "EXIT", code, file=sys.stderr)
"""


def _family(root: Path) -> Path:
    """A base and two fine-tunes of 3 small float32 tensors, and a recipe naming them."""
    rng = np.random.default_rng(0)
    shapes = {"embed.weight": (64, 32), "layer.0.weight": (32, 32), "norm.weight": (32,)}
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    for name, state in [("base", base), *((f"m{i}", {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
                                                     for k, v in base.items()}) for i in range(2))]:
        (root / name).mkdir()
        save_file(state, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text("{}")
    (root / "recipe.yaml").write_text("method: ties\nbase: base\nmodels: [m0, m1]\n")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = _family(Path(tmp))
        rows = {
            "python (floor)": [sys.executable, "-c", "pass"],
            "import numpy (floor)": [sys.executable, "-c", "import numpy"],
            "import torch (floor)": [sys.executable, "-c", "import torch"],
            "tiesmerge --version": [sys.executable, "-c", PROBE, "--version"],
            "tiesmerge --help": [sys.executable, "-c", PROBE, "--help"],
            "tiesmerge methods": [sys.executable, "-c", PROBE, "methods"],
            "tiesmerge validate recipe.yaml": [sys.executable, "-c", PROBE, "validate", "recipe.yaml"],
            "tiesmerge merge recipe.yaml --dry-run": [sys.executable, "-c", PROBE, "merge", "recipe.yaml", "--dry-run"],
            "tiesmerge merge recipe.yaml -o out (tiny model)": [sys.executable, "-c", PROBE, "merge", "recipe.yaml",
                                                                "-o", "out", "--force"],
        }
        times: dict[str, list[float]] = {k: [] for k in rows}
        heavy: dict[str, str] = {}
        for _ in range(args.runs):
            for label, command in rows.items():  # interleaved: background load spreads over every row
                clock = time.perf_counter()
                done = subprocess.run(command, cwd=root, capture_output=True, text=True)
                times[label].append(time.perf_counter() - clock)
                if done.returncode != 0:
                    raise SystemExit(f"{label} failed:\n{done.stderr}")
                report = [line for line in done.stderr.splitlines() if line.startswith("HEAVY")]
                heavy[label] = report[-1].split()[1] if report else "(floor)"
    lines = ["| command | min s | median s | max s | heavy modules loaded |", "|---|---:|---:|---:|---|"]
    for label, values in times.items():
        lines.append(f"| {label} | {min(values):.2f} | {statistics.median(values):.2f} | {max(values):.2f} | "
                     f"{heavy[label]} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.md").write_text(
        f"# Start-up ({args.runs} runs each, interleaved; `python benchmarks/speed/startup.py`)\n\n{table}\n")
    (args.out / "startup.json").write_text(json.dumps(
        {"runs": args.runs, "seconds": times, "heavy": heavy, "python": sys.version.split()[0]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
