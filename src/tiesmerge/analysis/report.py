"""The analysis on disk: ``analysis.json``, one PNG per figure, and a self-contained
``report.html`` (plots embedded as data URIs, so the file can be mailed or attached alone).

The directory is written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

from ..io.writer import atomic_directory
from ..paths import undecodable_as_bytes
from ..plotting import html_figure, html_page, html_table, plain, png, pyplot
from .summary import percent

__all__ = ["write_report", "render_html", "FIGURES"]

FIGURES = {
    "sign_conflicts.png": "Sign conflicts after trimming vs number of models merged (cf. the paper's Fig. 4)",
    "conflicts_by_layer.png": "Sign conflicts per layer and tensor type, all models",
    "redundancy.png": "Share of each task vector's L1 and L2 mass in its top-k",
    "overlap.png": "Overlap of the models' top-k masks (Jaccard index)",
    "magnitudes.png": "Merged magnitudes by influence and by sign agreement, mean ± std (cf. Fig. 6 and 8)",
}


def _pyplot():
    return pyplot("the analysis plots")


def _png(fig) -> bytes:
    return png(fig)


def _plot_conflicts(plt, data: dict) -> bytes:
    sizes = data["sign_conflicts"]["by_size"]
    x = [s["size"] for s in sizes]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, marker in (("of_parameters", "of all parameters", "o"),
                               ("of_kept_by_two_or_more", "of parameters kept by ≥2 models", "s")):
        mean = [100 * s[f"mean_{key}"] for s in sizes]
        ax.plot(x, mean, marker=marker, label=label)
        ax.fill_between(x, [100 * s[f"min_{key}"] for s in sizes], [100 * s[f"max_{key}"] for s in sizes], alpha=0.15)
    ax.set_xlabel("number of models merged")
    ax.set_ylabel("parameters with a sign conflict (%)")
    ax.set_title(f"Sign conflicts after keeping the top {percent(data['settings']['density'])}")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _plot_layers(plt, data: dict) -> bytes | None:
    rows = [t for t in data["by_tensor"] if t["layer"] is not None]
    if not rows:
        return None
    layers = sorted({t["layer"] for t in rows})
    size: dict[str, int] = {}
    for t in rows:
        size[t["module"]] = size.get(t["module"], 0) + t["numel"]
    # a figure of bounded size, whatever the names (4,000 tensors "t.0" .. "t.3999" drew a 33,000-pixel-tall heatmap
    # in 3.3 GB, hp37 C48): the largest module types, and layers pooled into bands
    modules = sorted(sorted(size, key=lambda m: -size[m])[:_MAX_MODULES])
    band = -(-len(layers) // _MAX_LAYER_ROWS)  # layers per row of the figure
    bands = [layers[i:i + band] for i in range(0, len(layers), band)]
    row_of = {layer: i for i, members in enumerate(bands) for layer in members}
    col_of = {m: j for j, m in enumerate(modules)}
    conflicts = [[0.0] * len(modules) for _ in bands]
    counted = [[0] * len(modules) for _ in bands]
    for t in rows:
        j = col_of.get(t["module"])
        if j is not None:  # pooled by parameter count: a band's share of its parameters in conflict
            conflicts[row_of[t["layer"]]][j] += t["of_parameters"] * t["numel"]
            counted[row_of[t["layer"]]][j] += t["numel"]
    grid = [[100 * c / n if n else float("nan") for c, n in zip(cs, ns)] for cs, ns in zip(conflicts, counted)]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(modules) + 3), max(3, 0.3 * len(bands) + 2)))
    image = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(modules)))
    ax.set_xticklabels([plain(m.split("*.", 1)[-1][:40]) for m in modules], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(bands)))
    ax.set_yticklabels([str(b[0]) if len(b) == 1 else f"{b[0]}–{b[-1]}" for b in bands], fontsize=7)
    ax.set_ylabel("layer" if band == 1 else f"layers ({band} per row)")
    fig.colorbar(image, ax=ax, label="% of the tensor in conflict")
    shown = "" if len(modules) == len(size) else f"; the {len(modules)} largest of {len(size)} module types"
    ax.set_title(f"Sign conflicts, all {data['n_models']} models{shown}")
    return _png(fig)


_MAX_MODULES = 60  # columns of the layer heatmap
_MAX_LAYER_ROWS = 96  # rows of the layer heatmap


def _plot_redundancy(plt, data: dict, labels: list[str]) -> bytes:
    red = data["redundancy"]
    x = [100 * k for k in red["densities"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in zip(axes, ("l1_share", "l2_share"), ("L1 mass", "L2 mass (squared norm)")):
        for label, curve in zip(labels, red[key]):
            ax.plot(x, [100 * v for v in curve], marker=".", label=label)
        ax.axvline(100 * data["settings"]["density"], color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("top-k kept (% of parameters, log scale)")
        ax.set_title(f"share of each task vector's {title}")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("% of the task vector's mass kept")
    axes[1].legend(fontsize=7)
    return _png(fig)


def _plot_overlap(plt, data: dict, labels: list[str]) -> bytes:
    jaccard = data["overlap"]["jaccard"]
    n = len(jaccard)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.6 + 0.6 * n))
    image = ax.imshow(jaccard, vmin=0, vmax=1, cmap="viridis")
    for s in range(n):
        for t in range(n):
            ax.text(t, s, f"{jaccard[s][t]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if jaccard[s][t] < 0.5 else "black")
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=7)
    fig.colorbar(image, ax=ax, label="Jaccard index of top-k masks")
    return _png(fig)


def _plot_magnitudes(plt, data: dict) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, xlabel in zip(axes, ("by_influence", "by_agreement"),
                               ("number of models keeping the parameter", "sign agreement (j of n models)")):
        part = data["magnitudes"][key]
        present = [i for i, c in enumerate(part["count"]) if c > 0]
        variants = list(part["mean"])
        width = 0.8 / len(variants)
        for v, variant in enumerate(variants):
            ax.bar([i + v * width for i in range(len(present))], [part["mean"][variant][g] for g in present], width,
                   yerr=[part["std"][variant][g] for g in present], capsize=2, label=variant)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(present))])
        ax.set_xticklabels([part["groups"][g] for g in present])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean |merged task vector|")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    return _png(fig)


def render_figures(data: dict, labels: list[str]) -> dict[str, bytes]:
    labels = [plain(label) for label in labels]  # drawn as written, never as mathtext (hp45 c39)
    plt = _pyplot()
    figures = {"sign_conflicts.png": _plot_conflicts(plt, data), "conflicts_by_layer.png": _plot_layers(plt, data),
               "redundancy.png": _plot_redundancy(plt, data, labels), "overlap.png": _plot_overlap(plt, data, labels),
               "magnitudes.png": _plot_magnitudes(plt, data)}
    plt.close("all")
    return {name: png for name, png in figures.items() if png is not None}


_table = html_table


def render_html(data: dict, figures: dict[str, bytes], labels: list[str]) -> str:
    """One self-contained page: the reading, every figure (embedded), the numbers behind them."""
    sc = data["sign_conflicts"]
    parts = [f"<h1>Interference analysis: {data['n_models']} models, top {percent(data['settings']['density'])}</h1>",
             "<p>Base <code>" + html.escape(str(data.get("inputs", {}).get("base", ""))) + "</code>; "
             f"{data['parameters']:,} parameters compared"
             + (f" ({html.escape(data['inputs']['measured'])})" if data.get("inputs", {}).get("measured") else "")
             + ".</p>",
             "<h2>Reading</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in data["summary"]) + "</ul>"]
    for name, caption in FIGURES.items():
        if name in figures:
            parts.append(html_figure(figures[name], caption, caption))
    parts.append("<h2>Sign conflicts by number of models</h2><p>Denominators: "
                 + "; ".join(f"<b>{html.escape(k)}</b>: {html.escape(v)}" for k, v in sc["denominators"].items())
                 + ".</p>")
    parts.append(_table(["models", "subsets", "conflicts, of all parameters (mean)", "min", "max",
                         "conflicts, of parameters kept by ≥2 (mean)"],
                        [[str(s["size"]), f"{len(s['subsets'])} of {s['total_subsets']}",
                          percent(s["mean_of_parameters"]),
                          percent(s["min_of_parameters"]), percent(s["max_of_parameters"]),
                          percent(s["mean_of_kept_by_two_or_more"])] for s in sc["by_size"]]))
    red = data["redundancy"]
    parts.append("<h2>Redundancy</h2>")
    parts.append(_table(["model", "threshold |τ|", *[f"L1 top {percent(k)}" for k in red["densities"]],
                         f"L1 at {percent(data['settings']['density'])} (exact)",
                         f"L2 at {percent(data['settings']['density'])} (exact)"],
                        [[label, "keeps nothing" if thr is None else f"{thr:.3g}",
                          *[percent(v) for v in red["l1_share"][t]],
                          percent(red["at_density"]["l1_share"][t]), percent(red["at_density"]["l2_share"][t])]
                         for t, (label, thr) in enumerate(zip(labels, data["thresholds"]))]))
    parts.append("<h2>Merged magnitudes (Fig. 6 and 8)</h2>")
    for key, title in (("by_influence", "by the number of models keeping the parameter"),
                       ("by_agreement", "by sign agreement")):
        part = data["magnitudes"][key]
        present = [g for g, c in enumerate(part["count"]) if c > 0]
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(_table(["merge", *[f"{part['groups'][g]} ({part['count'][g]:,})" for g in present]],
                            [[variant, *[f"{part['mean'][variant][g]:.3g} ± {part['std'][variant][g]:.3g}"
                                         for g in present]] for variant in part["mean"]]))
    tensors = sorted(data["by_tensor"], key=lambda t: -t["of_parameters"])
    parts.append("<details><summary>Sign conflicts per tensor (all models)</summary>"
                 + _table(["tensor", "parameters", "conflicts, of all", "conflicts, of kept by ≥2"],
                          [[t["name"], f"{t['numel']:,}", percent(t["of_parameters"]),
                            percent(t["of_kept_by_two_or_more"])] for t in tensors]) + "</details>")
    engine = data["engine"]
    parts.append(f"<p class=\"foot\">{engine['passes']} passes, {engine['bytes_read'] / 2**30:.2f} GiB read on "
                 f"{html.escape(engine['device'])}, memory budget {engine['memory_budget_bytes'] / 2**30:.2f} GiB; "
                 f"{data['seconds']['total']:.1f} s. Models: "
                 + ", ".join(f"{t}: <code>{html.escape(label)}</code>" for t, label in enumerate(labels)) + ".</p>")
    return html_page("tiesmerge analysis", parts)


def model_labels(data: dict) -> list[str]:
    models = data.get("inputs", {}).get("models") or [f"model {t}" for t in range(data["n_models"])]
    return [os.path.basename(str(m).rstrip("/")) or str(m) for m in models]


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float as None: JSON has no Infinity or NaN (Python writes them, JavaScript's
    JSON.parse and jq refuse the file); a figure that cannot be measured is null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_report(data: dict, output: str | os.PathLike, *, force: bool = False) -> Path:
    """Write analysis.json, the PNGs and report.html into ``output`` (replaced only with ``force``)."""
    shown = _displayable(data)  # names as text: a path byte that is no UTF-8 is drawn and written escaped
    labels = model_labels(shown)
    figures = render_figures(shown, labels)  # before the directory: a missing matplotlib leaves nothing behind
    with atomic_directory(output, force=force, marker="analysis.json") as tmp:
        (tmp / "analysis.json").write_text(json.dumps(_strict(data), indent=1, allow_nan=False) + "\n")
        for name, png in figures.items():
            (tmp / name).write_bytes(png)
        (tmp / "report.html").write_text(render_html(shown, figures, labels), encoding="utf-8")
    return Path(output)


def _displayable(value: object) -> object:
    """``value`` with every string made text: a lone surrogate (a path byte that is no UTF-8, '\\udcff', or a
    tensor name's '\\ud800' escape) becomes its escape, which matplotlib draws and UTF-8 writes (hostile pass 25,
    F12)."""
    if isinstance(value, str):  # a path's byte that is no UTF-8 as \xNN, as messages and the card show it (hp38 C17)
        return undecodable_as_bytes(value)
    if isinstance(value, dict):
        return {_displayable(k): _displayable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_displayable(v) for v in value]
    return value
