"""Issue 13, the twelfth independent hostile pass: one case per finding."""

from __future__ import annotations

import os
import stat

import tiesmerge
from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import make_base, run_cli, write_hf_dir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_adapter_and_demo_weights_follow_the_umask(tmp_path, capsys):
    """F4: a merged adapter's adapter_model.safetensors and the demo's shards were 0600 (safetensors' own mode) while
    every other output file follows the umask (0644 under 022)."""
    old = os.umask(0o022)
    try:
        base = make_base(0)
        b = write_hf_dir(tmp_path / "base", base)
        adapters = [write_lora_dir(tmp_path / f"a{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
        out = tiesmerge.merge(b, adapters, "ties", output=tmp_path / "out", output_format="adapter")
        assert _mode(out / "adapter_model.safetensors") == 0o644
        assert run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(tmp_path / "wd")], capsys)[0] == 0
        shards = list((tmp_path / "wd" / "base").glob("*.safetensors"))
        assert shards and all(_mode(p) == 0o644 for p in shards), [oct(_mode(p)) for p in shards]
    finally:
        os.umask(old)
