"""The epilogs of `tiesmerge COMMAND --help`: real command lines, and the files they read."""

MERGE_EXAMPLES = """\
examples:
  # TIES with the paper's defaults (density 0.2, lam 1.0, one threshold per model)
  tiesmerge merge --base ./base --model ./ft-math --model ./ft-code -o ./merged

  # per-tensor trimming and PEFT/mergekit's zero-sign rule, bf16 output in 2 GB shards
  tiesmerge merge --base ./base --model ./a --model ./b --scope per_tensor --zero-sign positive \\
      --dtype bfloat16 --shard-size 2GB -o ./merged

  # task arithmetic, the paper's no-validation lambda
  tiesmerge merge --base ./base --model ./a --model ./b --method task_arithmetic --lam 0.4 -o ./ta

  # what would happen, without reading any weights
  tiesmerge merge recipe.yaml -o ./merged --dry-run

  # PEFT LoRA adapters in, a merged LoRA adapter out (truncated SVD at rank 16)
  tiesmerge merge --base ./base --model ./lora-math --model ./lora-code --output-format adapter \\
      --rank 16 -o ./merged-lora

  # a mergekit recipe, as it is (linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, nuslerp,
  # breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock)
  tiesmerge merge mergekit.yaml -o ./merged

  # data-aware baselines: statistics first (tiesmerge stats --help), one --stats per --model
  tiesmerge merge --method fisher --base ./base --model ./a --stats ./fisher-a \\
      --model ./b --stats ./fisher-b -o ./fisher-merged
  tiesmerge merge --method regmean --alpha 0.95 --base ./base --model ./a --stats ./gram-a \\
      --model ./b --stats ./gram-b -o ./regmean-merged

recipe.yaml:
  method: ties
  base: ./base
  models: [{path: ./ft-math, weight: 1.0}, {path: ./ft-code, weight: 0.5}]
  parameters: {density: 0.2, lam: 1.0}

mergekit.yaml:
  merge_method: ties
  base_model: ./base
  models:
    - model: ./ft-math
      parameters: {density: 0.5, weight: 0.5}
    - model: ./ft-code
      parameters: {density: 0.5, weight: 0.5}
  parameters: {normalize: true}
  dtype: bfloat16
"""


STATS_EXAMPLES = """\
examples:
  # the exact diagonal Fisher of a sequence classifier on 256 labelled or unlabelled texts
  tiesmerge stats fisher --model ./ft-sst2 --data sst2-validation.jsonl --limit 256 -o ./fisher-sst2

  # Gram matrices X^T X / N of every Linear layer's inputs (padding excluded), for RegMean
  tiesmerge stats gram --model ./ft-sst2 --data sst2-validation.jsonl --limit 256 -o ./gram-sst2

data.jsonl, one example per line (label: only for --fisher empirical|batched):
  {"text": "a gripping, funny film", "label": 1}

The output is a statistics directory: model.safetensors keyed like the model, and
tiesmerge_stats.json (kind, examples, options, the model's digest, checked when merging).
Other models and likelihoods: tiesmerge.stats.fisher_information / gram_matrices in Python.
"""


TUNE_EXAMPLES = """\
examples:
  # the paper's grid for TIES (k in 0.1, 0.2, 0.3; lam 0.8..3.0), scored by your function
  tiesmerge tune --base ./base --model ./a --model ./b --evaluator my_eval:validation_accuracy -o ./best

  # task arithmetic, a custom lam grid
  tiesmerge tune --base ./base --model ./a --model ./b --method task_arithmetic \\
      --grid lam=0.1:1.0:0.05 --evaluator my_eval:validation_accuracy --json grid.json

  # no code: a built-in evaluator on a labeled validation file (see --evaluator)
  tiesmerge tune --base ./base --model ./a --model ./b --evaluator classifier-accuracy:val.jsonl -o ./best

my_eval.py:
  def validation_accuracy(state_dict) -> float:   # higher is better
      model.load_state_dict(state_dict); return accuracy(model, validation_data)

tau_m is merged once per density (or drop rate) and every lam is swept on top of it.
""" + "\n" + """\
built-in evaluators (--evaluator NAME:FILE; the model is the base directory's architecture):
  classifier-accuracy:FILE   sequence classifier accuracy; JSONL {"text", "label"} (+ "text_pair")
  choice-accuracy:FILE       LM rank classification; JSONL {"prompt", "choices": [...], "label"}
  encoder-accuracy:FILE      sentence encoder + zero-shot cosine heads, mean over tasks; JSONL
                             {"task", "classes": [...]} then {"task", "text", "label"}
                             (python -m tiesmerge_bench --export FILE writes the benchmark's)
  lm-perplexity:FILE         minus a causal LM's perplexity on a UTF-8 text file
"""


SEARCH_EXAMPLES = """\
examples:
  # CMA-ES over per-model densities and weights and lam, 60 candidates, in this process
  tiesmerge search --base ./base --model ./a --model ./b --model ./c --evaluator my_eval:validation_accuracy \\
      --strategy cmaes --budget 60 --axis densities --axis weights --axis lam --dir ./search -o ./best

  # the same on this machine's local Ray cluster (one task per CPU, or per GPU where there are GPUs)
  tiesmerge search ... --ray

  # 2 candidates at once, each evaluation with half the CPUs' threads; a built-in evaluator
  tiesmerge search ... --ray --workers 2 --evaluator classifier-accuracy:val.jsonl

  # on a running cluster (ray start --head on one node, ray start --address HEAD:6379 on the others)
  tiesmerge search ... --ray HEAD:6379

  # the paper's grid (the default strategy), or random search within ranges
  tiesmerge search --base ./base --model ./a --model ./b --evaluator my_eval:validation_accuracy
  tiesmerge search ... --strategy random --budget 40 --axis density --axis lam --range lam=0.5:2.0

Run the same command again to resume: every scored candidate is in DIR/log.jsonl and is not
scored again (a larger --budget goes on from there). DIR also gets results.md and report.html.
On a cluster the model paths and the evaluator's module must be readable on every node.
"""


ANALYZE_EXAMPLES = """\
examples:
  # sign conflicts, redundancy and merged magnitudes of three fine-tunes, at the paper's top 20%
  tiesmerge analyze --base ./base --model ./ft-math --model ./ft-code --model ./ft-chat -o ./interference

  # a 7B family on a small machine: every subset of the models, 1 GiB of working memory
  tiesmerge analyze --base ./llama --model ./a --model ./b --subsets-per-size 0 --memory-budget 1GiB -o ./r

writes analysis.json, one PNG per figure and report.html (self-contained: open it in a browser)
"""
