"""Interference analysis: statistics on hand-made task vectors with answers worked out by hand,
streaming (chunked == whole), and the report (HTML parses, images embedded, numbers = JSON)."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import tiesmerge
from helpers_ckpt import make_family, write_hf_dir
from tiesmerge.analysis import stats
from tiesmerge.analysis.summary import percent
from tiesmerge.cli.main import main
from tiesmerge.errors import ConfigError, InvalidTensorError

# three task vectors of 5 entries; with thresholds 0.5 every model keeps the entries marked *
#   entry:   0     1     2     3     4
#   m0:     +1*  -1*  +.5*   0    +2*
#   m1:     -1*  -1*    0   +3*   .1
#   m2:     +1*  +1*    0   -3*    0
HAND_TAU = torch.tensor([[1.0, -1.0, 0.5, 0.0, 2.0],
                         [-1.0, -1.0, 0.0, 3.0, 0.1],
                         [1.0, 1.0, 0.0, -3.0, 0.0]])
HAND_THRESHOLDS = torch.tensor([0.5, 0.5, 0.5])


def _hand_patterns() -> torch.Tensor:
    kept = stats.kept_mask(HAND_TAU, HAND_THRESHOLDS)
    return torch.bincount(stats.sign_pattern_codes(HAND_TAU, kept), minlength=27)


@pytest.mark.parametrize(("subset", "expected"), [
    ((0, 1, 2), {"conflicts": 3, "kept_by_two_or_more": 3, "kept_by_any": 5}),  # entries 0, 1, 3
    ((0, 1), {"conflicts": 1, "kept_by_two_or_more": 2, "kept_by_any": 5}),  # entry 0 (+ vs -)
    ((0, 2), {"conflicts": 1, "kept_by_two_or_more": 2, "kept_by_any": 5}),  # entry 1 (- vs +)
    ((1, 2), {"conflicts": 3, "kept_by_two_or_more": 3, "kept_by_any": 3}),  # entries 0, 1, 3
])
def test_subset_conflicts_by_hand(subset, expected):
    counts = _hand_patterns().numpy()
    assert stats.subset_conflicts(counts, stats.pattern_tables(3), subset) == expected


def test_tensor_conflicts_and_overlap_by_hand():
    kept = stats.kept_mask(HAND_TAU, HAND_THRESHOLDS)
    assert kept.tolist() == [[True, True, True, False, True], [True, True, False, True, False],
                             [True, True, False, True, False]]
    codes, tables = stats.sign_pattern_codes(HAND_TAU, kept), stats.pattern_tables(3)
    assert codes.tolist() == [1 + 2 * 3 + 1 * 9, 2 + 2 * 3 + 1 * 9, 1, 1 * 3 + 2 * 9, 1]
    assert stats.tensor_conflicts(torch.bincount(codes, minlength=27), tables) == {"conflicts": 3,
                                                                                    "kept_by_two_or_more": 3}
    assert stats.mask_intersections(kept).tolist() == [[4, 2, 2], [2, 3, 3], [2, 3, 3]]
    assert stats.influence_groups(codes, tables).tolist() == [2, 2, 1, 2, 1]
    assert stats.agreement_groups(HAND_TAU).tolist() == [2, 2, 1, 1, 2]  # entry 3: one +, one -, one 0


def test_merge_variants_by_hand():
    kept = stats.kept_mask(HAND_TAU, HAND_THRESHOLDS)
    v = stats.merge_variants(HAND_TAU.clone(), kept)
    torch.testing.assert_close(v["averaging"], torch.tensor([1 / 3, -1 / 3, 0.5 / 3, 0.0, 2.1 / 3]))
    # kept values whatever their sign: entry 0 (1 - 1 + 1) / 3; entry 4 only m0's 2
    torch.testing.assert_close(v["trim + disjoint mean"], torch.tensor([1 / 3, -1 / 3, 0.5, 0.0, 2.0]))
    # untrimmed election: entry 4 elects + and averages 2 and 0.1; entry 3 is a tie (0): nothing
    torch.testing.assert_close(v["elect + disjoint mean"], torch.tensor([1.0, -1.0, 0.5, 0.0, 1.05]))
    torch.testing.assert_close(v["TIES"], torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0]))


def test_topk_mass_share_matches_exact_sums():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(2, 5000, generator=g) * torch.rand(2, 5000, generator=g)
    counts = stats.magnitude_counts(tau)[0].numpy()
    mid = stats.bin_midpoints()
    assert counts.sum() == 5000
    for keep in (1, 50, 1000, 5000):
        top = tau[0].abs().double().sort(descending=True).values
        for power in (1, 2):
            exact = float(top[:keep].pow(power).sum() / top.pow(power).sum())
            approx = stats.topk_mass_share(counts, counts * mid**power, keep)
            assert approx == pytest.approx(exact, rel=1e-2 * power, abs=1e-3)


def test_bin_midpoints_hold_their_values():
    mid = stats.bin_midpoints()
    values = torch.tensor([1e-8, 3e-4, 0.5, 1.0, 5.0, 1e6])
    bins = (values.view(torch.int32) >> 16).numpy()
    relative = abs(mid[bins] - values.double().numpy()) / values.double().numpy()
    assert (relative <= 2**-8).all()  # half a bin's relative width
    assert mid[0x7F80:].max() == 0.0  # Inf and NaN bit patterns weigh nothing


# -- end to end on state dicts: one tensor of 10 entries, density 0.2 keeps 2 per model
BASE = {"w": torch.zeros(10)}
M0 = torch.tensor([5.0, 4.0, 1, 1, 1, 1, 1, 1, 1, 1])  # keeps entries 0, 1
M1 = torch.tensor([-5.0, 0.1, 4.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # keeps 0, 2
M2 = torch.tensor([6.0, -5.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # keeps 0, 1


def _hand_analysis(**kw):
    return tiesmerge.analyze(BASE, [{"w": M0.clone()}, {"w": M1.clone()}, {"w": M2.clone()}],
                             subsets_per_size=None, **kw)


def test_analyze_end_to_end_by_hand():
    data = _hand_analysis()
    assert data["kept_per_model"] == 2 and data["parameters"] == 10
    pairs, everyone = data["sign_conflicts"]["by_size"]
    # all three: entry 0 (+, -, +) and entry 1 (+4 vs -5) conflict; both are kept by >= 2 models
    assert everyone["subsets"][0]["conflicts"] == 2
    assert everyone["mean_of_parameters"] == pytest.approx(0.2)
    assert everyone["mean_of_kept_by_two_or_more"] == pytest.approx(1.0)
    # pairs (0,1): entry 0; (0,2): entry 1; (1,2): entry 0 -> one conflict in 10 each
    assert [s["conflicts"] for s in pairs["subsets"]] == [1, 1, 1]
    assert pairs["mean_of_parameters"] == pytest.approx(0.1)
    assert pairs["total_subsets"] == 3
    # redundancy: m0 keeps 5 + 4 of its L1 mass 17, and 25 + 16 of its squared norm 49
    red = data["redundancy"]
    assert red["at_density"]["l1_share"][0] == pytest.approx(9 / 17)
    assert red["at_density"]["l2_share"][0] == pytest.approx(41 / 49)
    assert red["l1_share"][0][red["densities"].index(0.2)] == pytest.approx(9 / 17, rel=2**-8)
    assert red["l1_share"][0][-1] == pytest.approx(1.0)
    # overlap: m0 and m1 share entry 0 of 3 kept between them
    assert data["overlap"]["jaccard"][0][1] == pytest.approx(1 / 3)
    assert data["overlap"]["jaccard"][0][2] == pytest.approx(1.0)
    # Fig. 6: entries 0, 1 are kept by > 1 model; TIES gives 5.5 (5, 6 agree) and 5 (-5 elected)
    mags = data["magnitudes"]["by_influence"]
    assert mags["count"] == [7, 1, 2]
    assert mags["mean"]["TIES"][2] == pytest.approx(5.25)
    assert mags["mean"]["averaging"][2] == pytest.approx((2.0 + 0.3) / 2)
    assert mags["mean"]["trim + disjoint mean"][2] == pytest.approx((2.0 + 0.5) / 2)
    assert mags["std"]["TIES"][2] == pytest.approx(0.25)
    assert mags["mean"]["TIES"][1] == pytest.approx(4.0)  # entry 2: only m1 keeps it
    assert mags["mean"]["TIES"][0] == 0.0  # nothing kept, nothing merged


def test_chunked_stream_gives_the_same_statistics(tmp_path):
    base, models = make_family(3, seed=3)
    whole = tiesmerge.analyze(base, models, memory_budget="1GiB", subsets_per_size=None)
    chunked = tiesmerge.analyze(base, models, memory_budget=4096, subsets_per_size=None)
    assert chunked["engine"]["chunks_per_pass"] > whole["engine"]["chunks_per_pass"]
    for key in ("sign_conflicts", "by_tensor", "overlap", "thresholds", "kept_per_model"):
        assert chunked[key] == whole[key], key
    for key in ("redundancy", "magnitudes"):
        assert _close(chunked[key], whole[key]), key


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-12)  # float32 sums within blocks
    return a == b


def test_fused_and_torch_histograms_agree(monkeypatch):
    base, models = make_family(3, seed=5)
    fused = tiesmerge.analyze(base, models)
    monkeypatch.setenv("TIESMERGE_KERNELS", "0")
    plain = tiesmerge.analyze(base, models)
    for key in ("thresholds", "redundancy", "sign_conflicts"):
        assert fused[key] == plain[key], key
    # exact: each model's k-th largest |tau| over its whole model
    names = [k for k, v in base.items() if v.is_floating_point()]
    for t, m in enumerate(models):
        tau = torch.cat([(m[k] - base[k]).flatten() for k in names]).abs()
        keep = int(0.2 * tau.numel())
        assert fused["thresholds"][t] == float(tau.sort(descending=True).values[keep - 1])


def test_subset_sample_is_seeded_and_bounded():
    base, models = make_family(6, seed=1)
    a = tiesmerge.analyze(base, models, subsets_per_size=4, seed=7)
    b = tiesmerge.analyze(base, models, subsets_per_size=4, seed=7)
    sizes = {s["size"]: s for s in a["sign_conflicts"]["by_size"]}
    assert [len(s["subsets"]) for s in a["sign_conflicts"]["by_size"]] == [4, 4, 4, 4, 1]
    assert sizes[3]["total_subsets"] == 20
    assert a["sign_conflicts"] == b["sign_conflicts"]


def test_bad_settings_and_inputs_are_typed_errors():
    base, models = make_family(2)
    with pytest.raises(ConfigError, match="at least 2"):
        tiesmerge.analyze(base, models[:1])
    with pytest.raises(ConfigError, match="not a percent"):
        tiesmerge.analyze(base, models, density=20)
    bad = {k: v.clone() for k, v in models[1].items()}
    bad["model.norm.weight"][3] = float("nan")
    with pytest.raises(InvalidTensorError, match="model.norm.weight"):
        tiesmerge.analyze(base, [models[0], bad])


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


def test_cli_analyze(tmp_path, capsys):
    base, models = make_family(2, seed=4)
    write_hf_dir(tmp_path / "base", base)
    args = ["analyze", "--base", str(tmp_path / "base")]
    for i, m in enumerate(models):
        args += ["--model", str(write_hf_dir(tmp_path / f"ft{i}", m))]
    assert main([*args, "-o", str(tmp_path / "r"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "conflict in sign" in printed
    assert (tmp_path / "r" / "report.html").is_file()
    assert main([*args, "-o", str(tmp_path / "r")]) == 1  # exists: needs --force
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "r2"), "--density", "0"]) == 2
    assert not (tmp_path / "r2").exists()


# -- TIES with a sign vector from another model (--sign-from)
def _sign_family(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    base = {"w": torch.zeros(3), "b": torch.ones(2)}
    t0 = {"w": torch.tensor([1.0, -2.0, 3.0]), "b": torch.tensor([2.0, 1.5])}
    t1 = {"w": torch.tensor([-3.0, 1.0, 1.0]), "b": torch.tensor([1.5, 0.0])}
    ref = {"w": torch.tensor([1.0, 1.0, -1.0]), "b": torch.tensor([1.0, 0.0])}  # b: task vector 0, -1
    paths = [write_hf_dir(tmp_path / name, sd) for name, sd in (("t0", t0), ("t1", t1))]
    return write_hf_dir(tmp_path / "base", base), paths, write_hf_dir(tmp_path / "ref", ref)


def test_sign_from_takes_the_reference_signs(tmp_path):
    base, models, ref = _sign_family(tmp_path)
    elected = tiesmerge.merge(base, models, "ties", density=1.0)
    taken = tiesmerge.merge(base, models, "ties", density=1.0, sign_from=str(ref))
    # elected: w -> [-, -, +]: [-3, -2, mean(3, 1)]
    torch.testing.assert_close(elected["w"], torch.tensor([-3.0, -2.0, 2.0]))
    # the reference's signs [+, +, -]: [1, 1, nothing agrees -> 0]
    torch.testing.assert_close(taken["w"], torch.tensor([1.0, 1.0, 0.0]))
    # b: tau = [1, 0.5], [0.5, -1]; reference tau [0, -1]: sign 0 -> base, - -> -1
    torch.testing.assert_close(taken["b"], torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_sign_from_with_per_model_densities(tmp_path, scope):
    """Per-model densities count the merged models only; the reference is streamed untrimmed."""
    base, models, ref = _sign_family(tmp_path)
    both = tiesmerge.merge(base, models, "ties", densities=(1.0, 1.0), scope=scope, sign_from=str(ref))
    torch.testing.assert_close(both["w"], torch.tensor([1.0, 1.0, 0.0]))
    # model 1 keeps 1 of 5 entries (global) / 1 of 3 in w: its -3 only; model 0 keeps everything
    sparse = tiesmerge.merge(base, models, "ties", densities=(1.0, 0.2 if scope == "global" else 0.34),
                             scope=scope, sign_from=str(ref))
    torch.testing.assert_close(sparse["w"], torch.tensor([1.0, 0.0, 0.0]))


def test_sign_from_cli_and_manifest(tmp_path):
    base, models, ref = _sign_family(tmp_path)
    args = ["merge", "--base", str(base), "--model", str(models[0]), "--model", str(models[1]),
            "--density", "1", "--sign-from", str(ref), "-o", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "out" / "tiesmerge.json").read_text())
    assert manifest["inputs"]["sign_from"]["label"].startswith(str(ref))
    assert len(manifest["inputs"]["models"]) == 2
    assert manifest["method"]["options"]["sign_from"] == str(ref)
    assert re.search(r"sign_from", (tmp_path / "out" / "README.md").read_text())


def test_sign_from_the_base_is_refused(tmp_path):
    base, models, _ = _sign_family(tmp_path)
    with pytest.raises(ConfigError, match="base itself"):
        tiesmerge.merge(base, models, "ties", sign_from=str(base))
    with pytest.raises(ConfigError, match="sign_from"):
        tiesmerge.methods.Ties(sign_from=3)
