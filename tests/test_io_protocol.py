"""The tensor facts every checkpoint answers (io/protocol.py), without torch until asked."""

from __future__ import annotations

import torch

from tiesmerge.dtypes import BY_CODE
from tiesmerge.io.checkpoint import TensorInfo


def test_tensor_info_takes_any_dtype_spelling_and_answers_torch_on_demand():
    infos = {TensorInfo((4, 3), d) for d in (torch.bfloat16, "bf16", BY_CODE["BF16"])}
    assert len(infos) == 1
    (info,) = infos
    assert (info.shape, info.itemsize, info.is_floating, info.numel, info.nbytes) == ((4, 3), 2, True, 12, 24)
    assert info.dtype is torch.bfloat16 and info.dtype_info.code == "BF16"
    scalar = TensorInfo(torch.Size([]), torch.int64)
    assert scalar.shape == () and (scalar.numel, scalar.nbytes, scalar.is_floating) == (1, 8, False)
    assert TensorInfo((2,), torch.float32) != TensorInfo((2,), torch.float16)
