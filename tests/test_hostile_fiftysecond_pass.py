"""Hostile pass 56 and the leftovers of pass 55: messages that name what is wrong."""

from __future__ import annotations

import pytest

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
