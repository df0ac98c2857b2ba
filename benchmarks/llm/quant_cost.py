"""What the Q4_1 quantisation costs, measured without the full-precision weights (no registry package
carries them): the noise a Q4_1 grid puts on each weight, and the perplexity change of one more round of it.

Q4_1 (ggml) stores each block of 32 weights as q * d + m with q in 0..15, d = (max - min) / 15 and
m = min of the block; the rounding error of a weight is at most d / 2, about d / sqrt(12) RMS. The
dequantised weights keep that structure, so each block's d is read back from them. A second Q4_1
round on blocks shifted by 16 weights puts fresh noise of the same size on the same weights; to
first order (a loss locally quadratic in independent noise) the perplexity it adds estimates what the
first round cost. The token embedding (tied to the output head) is Q8_0 in the file (d = amax / 127).

    python benchmarks/llm/quant_cost.py      # -> benchmarks/results/llm_quant.json
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
import model as smol  # noqa: E402
import torch  # noqa: E402

from tiesmerge.paths import write_file  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _blocks(w: torch.Tensor, shift: int) -> torch.Tensor:
    """(rows, cols) -> (rows, cols / 32, 32) blocks of each row, the row rolled left by ``shift``."""
    return w.roll(-shift, dims=1).reshape(w.shape[0], -1, 32)


def q4_1_step(w: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """Each block's Q4_1 step d = (max - min) / 15: (rows, cols / 32)."""
    b = _blocks(w, shift)
    return (b.amax(-1) - b.amin(-1)) / 15


def requantise_q4_1(w: torch.Tensor, shift: int) -> torch.Tensor:
    """One Q4_1 round (round to nearest) on blocks shifted by ``shift`` weights."""
    b = _blocks(w, shift)
    lo, d = b.amin(-1, keepdim=True), (b.amax(-1, keepdim=True) - b.amin(-1, keepdim=True)) / 15
    q = ((b - lo) / d.clamp_min(1e-30)).round().clamp(0, 15)
    return (q * d + lo).reshape(w.shape).roll(shift, dims=1)


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    started = time.perf_counter()
    base = smol.base_dir()
    tok = AutoTokenizer.from_pretrained(base)
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    passages = common.austen_passages(16)
    noise2 = signal2 = 0.0
    levels = []
    matrices = {n: p for n, p in lm.named_parameters() if p.dim() == 2 and "embed" not in n}
    for p in matrices.values():
        w = p.detach()
        d = q4_1_step(w)  # (rows, blocks)
        noise2 += float((d.double() ** 2).sum() * 32 / 12)
        signal2 += float((w.double() ** 2).sum())
        if len(levels) < 4:  # the dequantised blocks hold at most 16 values: the grid is really there
            levels.append(int(max(torch.unique(b).numel() for b in _blocks(w, 0)[0, :64])))
    emb = lm.get_input_embeddings().weight.detach()
    emb_d = emb.reshape(emb.shape[0], -1, 32).abs().amax(-1) / 127
    emb_ratio = math.sqrt(float((emb_d.double() ** 2).sum() * 32 / 12) / float((emb.double() ** 2).sum()))
    ppl_dequantised = common.perplexity(lm, tok, passages, batch_size=8)
    with torch.no_grad():
        for p in matrices.values():
            p.copy_(requantise_q4_1(p.detach(), shift=16))
    ppl_twice = common.perplexity(lm, tok, passages, batch_size=8)
    out = {"matrices_q4_1": len(matrices), "distinct_values_per_block_max": max(levels),
           "q4_1_noise_to_weight_rms": math.sqrt(noise2 / signal2), "q8_0_embedding_noise_to_weight_rms": emb_ratio,
           "passages": len(passages), "ppl_dequantised": ppl_dequantised, "ppl_one_more_q4_1_round": ppl_twice,
           "estimated_ppl_without_quantisation": ppl_dequantised ** 2 / ppl_twice,
           "seconds": time.perf_counter() - started}
    write_file(RESULTS / "llm_quant.json", json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
