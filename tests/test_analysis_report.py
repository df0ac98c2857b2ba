"""The interference report (analysis/report.py): the HTML parses, images are embedded, numbers = JSON."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import tiesmerge
from helpers_ckpt import make_family, write_hf_dir
from tiesmerge.analysis.summary import percent


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.items: list[str] = []
        self.cells: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag in ("li", "td"):
            self._in = tag
            (self.items if tag == "li" else self.cells).append("")

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "li":
            self.items[-1] += data
        elif self._in == "td":
            self.cells[-1] += data


def test_report_files_render_and_agree_with_the_json(tmp_path):
    base, models = make_family(3, seed=2)
    write_hf_dir(tmp_path / "base", base)
    paths = [write_hf_dir(tmp_path / f"ft{i}", m) for i, m in enumerate(models)]
    data = tiesmerge.analyze(tmp_path / "base", paths, output=tmp_path / "report")
    out = tmp_path / "report"
    on_disk = json.loads((out / "analysis.json").read_text())
    assert on_disk["summary"] == data["summary"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["sign_conflicts.png", "conflicts_by_layer.png", "redundancy.png", "overlap.png",
                           "magnitudes.png"])
    page = _Collect()
    page.feed((out / "report.html").read_text())
    page.close()
    assert len(page.images) == len(pngs)
    embedded = [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in page.images]
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in embedded)
    assert sorted(embedded) == sorted((out / name).read_bytes() for name in pngs)
    assert page.items == on_disk["summary"]
    # the Fig. 4 table: one row per size, the mean share of all parameters as in the JSON
    for size in on_disk["sign_conflicts"]["by_size"]:
        row_start = page.cells.index(f"{len(size['subsets'])} of {size['total_subsets']}") - 1
        assert page.cells[row_start] == str(size["size"])
        assert page.cells[row_start + 2] == percent(size["mean_of_parameters"])
    everyone = on_disk["sign_conflicts"]["by_size"][-1]
    assert percent(everyone["mean_of_kept_by_two_or_more"]) in on_disk["summary"][0]
    assert not list(tmp_path.glob(".report.tiesmerge-*"))
