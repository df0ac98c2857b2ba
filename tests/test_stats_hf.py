"""Statistics of Hugging Face models from JSON lines (stats/hf.py), through `tiesmerge stats
fisher|gram` on a tiny BERT classifier, then `tiesmerge merge --stats`; the data file's errors."""

from __future__ import annotations

import json

import pytest
import torch

from helpers_ckpt import assert_no_output
from helpers_models import TEXTS
from tiesmerge.cli.main import main
from tiesmerge.stats import load_stats

transformers = pytest.importorskip("transformers")


def test_stats_then_merge_with_fisher_and_regmean(classifiers, tmp_path, capsys):
    root, base, fts, data = classifiers
    for kind in ("fisher", "gram"):
        for k, ft in enumerate(fts):
            assert main(["stats", kind, "--model", str(ft), "--data", str(data), "--batch-size", "2",
                         "-o", str(tmp_path / f"{kind}{k}")]) == 0
            assert f"wrote {kind} statistics" in capsys.readouterr().out
    fisher = load_stats(tmp_path / "fisher0")
    assert fisher.manifest.examples == len(TEXTS) and fisher.manifest.options["kind"] == "exact"
    assert fisher.manifest.model_digest.startswith("files:")
    assert "classifier.weight" in fisher.tensors and (fisher.tensors["classifier.weight"] > 0).all()
    gram = load_stats(tmp_path / "gram0")
    assert gram.tensors["bert.encoder.layer.0.intermediate.dense.weight"].shape == (16, 16)
    assert gram.tensors["classifier.weight"].shape == (16, 16)  # the head on the pooled vector
    for method, kind, extra in (("fisher", "fisher", ["--normalize", "rms"]), ("regmean", "gram", ["--alpha", "0.9"])):
        out = tmp_path / f"out-{method}"
        argv = ["merge", "--method", method, "--base", str(base), *extra, "-o", str(out)]
        for k, ft in enumerate(fts):
            argv += ["--model", str(ft), "--stats", str(tmp_path / f"{kind}{k}")]
        assert main(argv) == 0, capsys.readouterr().err
        manifest = json.loads((out / "tiesmerge.json").read_text())
        assert manifest["method"]["name"] == method and len(manifest["statistics"]) == 2
        merged = transformers.AutoModelForSequenceClassification.from_pretrained(out)
        assert merged(input_ids=torch.tensor([[4, 6]])).logits.shape == (1, 3)


def test_stats_errors(classifiers, tmp_path, capsys):
    root, base, fts, data = classifiers
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good film"}\n{"label": 1}\n')
    assert main(["stats", "fisher", "--model", str(fts[0]), "--data", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: each line must be an object with a string 'text'" in capsys.readouterr().err
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"text": "good film"}\n')
    assert main(["stats", "fisher", "--fisher", "empirical", "--model", str(fts[0]), "--data", str(unlabelled),
                 "-o", str(tmp_path / "o")]) == 2
    assert "needs an integer 'label'" in capsys.readouterr().err
    assert_no_output(tmp_path / "o")
    # merging without statistics
    assert main(["merge", "--method", "fisher", "--base", str(base), "--model", str(fts[0]), "--model", str(fts[1]),
                 "-o", str(tmp_path / "m")]) == 2
    assert "needs fisher statistics" in capsys.readouterr().err
    assert_no_output(tmp_path / "m")
