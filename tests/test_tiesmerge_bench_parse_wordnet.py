"""tiesmerge_bench.parse_wordnet: glosses labelled by their lexicographer file."""

from __future__ import annotations

import pytest

from helpers_bench import WN_FIXTURE
from tiesmerge_bench import LEXNAMES, DataSourceError, parse_wordnet_data


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
