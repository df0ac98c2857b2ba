"""Why whole-tensor recipes (slerp, nuslerp) import torch: torch's acos and sin on a one-entry float32 tensor are not
glibc's or numpy's. From the repo root:

    python benchmarks/speed/torch_scalar_math.py [--samples 20000]

Counts, over random inputs, how often torch's result (the value mergekit's SLERP coefficients come from) differs
from glibc's acosf/sinf (ctypes) and from numpy's float32 functions. Any difference means that a torch-free
scalar path could not be bit-identical to mergekit without reproducing torch's own (SLEEF) functions.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=20000)
    args = p.parse_args()
    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    for name in ("acosf", "sinf"):
        getattr(libm, name).restype = ctypes.c_float
        getattr(libm, name).argtypes = [ctypes.c_float]
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, args.samples).astype(np.float32)  # acos' domain
    y = rng.uniform(0, 3.2, args.samples).astype(np.float32)  # sin of an angle in [0, pi]
    one = {"acos": np.array([torch.acos(torch.tensor([[v]])).item() for v in x], np.float32),
           "sin": np.array([torch.sin(torch.tensor([[v]])).item() for v in y], np.float32)}
    glibc = {"acos": np.array([libm.acosf(float(v)) for v in x], np.float32),
             "sin": np.array([libm.sinf(float(v)) for v in y], np.float32)}
    numpy = {"acos": np.arccos(x), "sin": np.sin(y)}
    vector = {"acos": torch.acos(torch.from_numpy(x)).numpy(), "sin": torch.sin(torch.from_numpy(y)).numpy()}
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.samples} inputs each")
    for f in ("acos", "sin"):
        print(f"{f}: torch (one entry) differs from glibc in {int((one[f] != glibc[f]).sum())}, from numpy in "
              f"{int((one[f] != numpy[f]).sum())}, from torch on a long tensor in {int((one[f] != vector[f]).sum())}")


if __name__ == "__main__":
    main()
