"""A short plain-language reading of the analysis numbers, one sentence per finding.

Every number in a sentence is formatted from the analysis dict by :func:`percent`, so the
report's text and its JSON cannot disagree.
"""

from __future__ import annotations

__all__ = ["percent", "summarise"]


def percent(fraction: float) -> str:
    """0.3812 -> '38.1%'."""
    return f"{100 * fraction:.1f}%"


def summarise(data: dict) -> list[str]:
    n = data["n_models"]
    k = data["settings"]["density"]
    sizes = data["sign_conflicts"]["by_size"]
    everyone = sizes[-1]
    first = sizes[0]
    if k * data["parameters"] < 1:  # nothing is kept: every ratio below would be 0 / 0
        return [f"At density {k:g} each model keeps less than one of its {data['parameters']:,} parameters, so "
                "there is nothing to compare: no conflict, overlap or mass can be measured; use a larger --density."]
    totals = data["redundancy"]["at_density"].get("l1_total")
    zero = [i for i, total in enumerate(totals or []) if total == 0]
    if zero and len(zero) == n:  # copies of the base: every ratio below would be 0 / 0
        return [f"Every model is identical to the base (all {n} task vectors are zero): there is nothing to merge, "
                "and no conflict, overlap or mass to measure. Check that --model names the fine-tuned models."]
    lines = [f"Model(s) {', '.join(map(str, zero))} are identical to the base (a zero task vector): they keep no "
             "entry, and the figures below describe the others."] if zero else []
    if data.get("inputs", {}).get("measured"):  # what a parameter is here, when not a weight (IA)³
        lines.insert(0, f"Measured: {data['inputs']['measured']}.")
    twins = [(s, t) for s, t in data.get("identical_pairs", []) if s not in zero]  # reports before it lack the key
    if twins:
        lines.append(f"Model(s) {', '.join(f'{s} and {t}' for s, t in twins)} have the same task vector, entry for "
                     "entry: the same model given twice (was another folder meant?); in a merge it counts twice.")
    lines.append(
        f"With all {n} models trimmed to their top {percent(k)}, {percent(everyone['mean_of_kept_by_two_or_more'])} of "
        f"the parameters that two or more models keep conflict in sign; that is "
        f"{percent(everyone['mean_of_parameters'])} of all {data['parameters']:,} parameters.")
    if n > 2:  # with two models the pairs are all of them: nothing to compare (hp63a c29)
        lines.append(
            f"Conflicts {'grow' if everyone['mean_of_parameters'] > first['mean_of_parameters'] else 'do not grow'} "
            f"with the number of models merged: {percent(first['mean_of_parameters'])} of all parameters "
            f"for pairs of models (mean over {len(first['subsets'])} pair(s)), "
            f"{percent(everyone['mean_of_parameters'])} for all {n}.")
    live = [i for i in range(n) if i not in zero]  # the models whose figures are described (a zero one keeps nothing)
    at = data["redundancy"]["at_density"]
    l1, l2 = [at["l1_share"][i] for i in live], [at["l2_share"][i] for i in live]
    if k < 1:  # density 1 keeps every entry: all of the mass, by definition (hp63a c29: "most ... sits in its
        # largest entries" said of that)
        lines.append(f"Density {k:g} keeps {percent(sum(l1) / len(l1))} of each task vector's L1 mass "
                     f"(from {percent(min(l1))} to {percent(max(l1))} across models) and {percent(sum(l2) / len(l2))} "
                     "of its L2 mass (squared norm): "
                     + ("most of a task vector sits in its largest entries." if sum(l1) / len(l1) >= 0.5 else
                        "a task vector's mass is spread over many entries, beyond the ones kept."))
    else:
        lines.append("Density 1 keeps every entry, so nothing is trimmed: the figures describe the untrimmed task "
                     "vectors (a density below 1 shows how their mass sits in their largest entries).")
    overlap = data["overlap"]
    shares = [overlap["intersections"][i][i] / data["parameters"] for i in live]  # entries kept, ties included
    # merge's own warning's rule (engine.reduce.TIES_EXCESS): float32 rounding of tiny task vectors leaves a few
    # distinct magnitudes, and the report said "trimmed to their top 20%" of models that kept 100% (hp41 C44)
    if shares and max(shares) > 1.5 * k + 0.01:
        lines.append(f"Many entries tie at the trim's threshold, and keeping every tie (TIES's rule) keeps far more "
                     f"than the density: the models keep {percent(min(shares))} to {percent(max(shares))} of their "
                     f"entries, not {percent(k)} (the figures above and below count every tie as kept); a merge with "
                     "--threshold-ties sort keeps exactly the density.")
    if len(live) < 2:
        lines.append(f"Only model {live[0]} changes the base, so there is no overlap between models' masks to measure.")
    else:  # the pairs of models that keep something, and random masks of their own density
        jaccard = [overlap["jaccard"][s][t] for a, s in enumerate(live) for t in live[a + 1:]]
        kept = [overlap["intersections"][i][i] for i in live]
        density = sum(kept) / len(kept) / data["parameters"]
        lines.append(f"The models' top-{percent(k)} masks overlap with a mean pairwise Jaccard index of "
                     f"{sum(jaccard) / len(jaccard):.3f}, against {density / (2 - density):.3f} for independent "
                     "random masks of the same density.")
    influence = data["magnitudes"]["by_influence"]
    one = influence["groups"].index("1")
    if influence["count"][one]:
        avg, ties = influence["mean"]["averaging"][one], influence["mean"]["TIES"][one]
        lines.append(f"Where exactly one model finds a parameter influential, plain averaging leaves a mean merged "
                     f"magnitude of {avg:.3g}, TIES {ties:.3g} ({ties / avg:.1f}× larger): averaging dilutes a "
                     "value that only one model needs." if avg else
                     "Where exactly one model finds a parameter influential, TIES keeps a mean magnitude of "
                     f"{ties:.3g}.")
    tensors = [t for t in data["by_tensor"] if t["numel"] >= 1]
    if tensors and max(t["of_parameters"] for t in tensors) == 0:
        lines.append("No tensor has a sign conflict among the parameters the models keep.")
    elif tensors:
        worst = max(tensors, key=lambda t: t["of_parameters"])
        lines.append(f"The most conflicted tensor is {worst['name']} ({percent(worst['of_parameters'])} of its "
                     f"{worst['numel']:,} parameters, all {n} models).")
    return lines
