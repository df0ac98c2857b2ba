"""The check of merged values: a chunk about to be written must hold only finite numbers.

A merge overflows when its values exceed the output dtype (float16 tops out at 65504) or when
λ is absurd (``--lam 1e300``); the writer checks each chunk as it arrives, on its own thread,
before the bytes reach the file, so an overflow is an error naming the tensor and the output
is never renamed into place. Chunks are the stored bytes (a bfloat16 as its uint16 bits) or
torch tensors; the check works on the bits in blocks that stay in cache, without torch.

>>> import numpy as np
>>> first_nonfinite(np.array([1.0, np.inf], np.float32), "F32")
1
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidTensorError

__all__ = ["first_nonfinite", "check_finite", "NotFiniteError", "overflow_hint", "check_fits_float8", "check_copy_fits"]

# (signed view, unsigned view, exponent mask) per floating safetensors code. A value is Inf or
# NaN exactly when every exponent bit is set: as a signed integer, a positive one is then at least
# the mask, and as an unsigned integer a negative one is at least sign bit | mask. So two max
# reductions (SIMD, no temporaries) decide a chunk; the position is looked for only on failure.
_VIEWS = {"F16": (np.int16, np.uint16, 0x7C00), "BF16": (np.int16, np.uint16, 0x7F80),
          "F32": (np.int32, np.uint32, 0x7F800000), "F64": (np.int64, np.uint64, 0x7FF0000000000000)}


def first_nonfinite(chunk: Any, code: str) -> int | None:
    """Index (flat) of the first Inf or NaN in ``chunk`` of dtype ``code`` (safetensors' name),
    or None. ``chunk``: a numpy array of the values or stored bits, or a torch tensor."""
    spec = _VIEWS.get(code)
    if spec is None:  # integers, bool, float8: nothing to check (float8 has no Inf to overflow into)
        return None
    if not isinstance(chunk, np.ndarray):  # a torch tensor in the output dtype (torch is loaded)
        import torch

        values = chunk.detach()
        if values.is_floating_point() and values.element_size() == 1:  # float8: torch has no isfinite for it
            values = values.float()  # (hp81b c11: "isfinite not implemented for 'Float8_e4m3fn'", "a bug")
        bad = ~torch.isfinite(values)
        if not bool(bad.any()):
            return None
        return int(bad.reshape(-1).nonzero()[0, 0])
    signed, unsigned, mask = spec
    flat = np.ascontiguousarray(chunk).reshape(-1)
    if not flat.size:
        return None
    as_signed, as_unsigned = flat.view(signed), flat.view(unsigned)
    sign = 1 << (8 * flat.itemsize - 1)
    if as_signed.max() < mask and as_unsigned.max() < sign | mask:
        return None
    return int(np.flatnonzero((as_unsigned & unsigned(mask)) == unsigned(mask))[0])


class NotFiniteError(InvalidTensorError):
    """A merged value that is not finite in the output dtype ``code``: the hint says what helps (a caller that knows
    the method replaces it with :func:`overflow_hint` of whether the method scales its task vectors)."""

    def __init__(self, message: str, *, code: str, tensor: str | None = None, element: int | None = None) -> None:
        super().__init__(message, hint=overflow_hint(code, scaled=True))
        self.code = code
        self.tensor, self.element = tensor, element  # where: the executor looks up the base's own value there
        self.base_value: float | None = None  # set where the base's value itself is past the dtype's range

    def blame_the_base(self, value: float, remedy: str = "write a wider dtype (--dtype bfloat16 or float32)") -> None:
        """The base's own value at the element is past the output dtype's range: no lam or weight is to blame, only a
        wider dtype helps (hp47 c66: "use a smaller lam" at lam 0.001). ``remedy``: how the caller's user sets a wider
        output dtype (``--dtype``; a recipe's out_dtype): callers that rewrite the hint call :meth:`wider_dtype_hint`
        with their own."""
        self.base_value = value
        self.message += (f"; the base's own value there is {value:.6g}, past {_NAMES.get(self.code, self.code)}'s "
                         f"largest {_TOPS.get(self.code, '3.4e38')}")
        self.hint = self.wider_dtype_hint(remedy)

    def wider_dtype_hint(self, remedy: str) -> str:
        return (f"{remedy}: the base's own value there is past {_TOPS.get(self.code, '3.4e38')}, so only a merge "
                "that moves far from the base at that entry fits there")  # (hp49 c13: "whatever the scaling" was false)


_TOPS = {"F16": "65504", "BF16": "3.39e38", "F32": "3.4e38", "F64": "3.4e38 (the merge computes in float32)"}
_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def check_finite(name: str, chunk: Any, code: str, offset: int = 0) -> None:
    """Raise NotFiniteError when ``chunk`` (elements ``offset``.. of tensor ``name``) is not finite."""
    where = first_nonfinite(chunk, code)
    if where is None:
        return
    raise NotFiniteError(
        f"tensor {name!r}: the merged value at element {offset + where:,} is not finite (Inf or NaN) in the output "
        f"dtype {code}; the merge overflowed, so no merged model was written or returned", code=code, tensor=name,
        element=offset + where)


def overflow_hint(code: str, *, scaled: bool, levers: str | None = None) -> str:
    """What helps against an overflow in output dtype ``code``; ``scaled``: the method has a scaling factor (lam) or
    per-model weights to lower (SLERP, NuSLERP and Model Stock interpolate: only the inputs can be to blame);
    ``levers``: the method's own words for them where it has no lam (average: "smaller per-model weights ...": hp63a
    c06, told to use a smaller lam, which average refuses)."""
    if not scaled:
        wider = "write a wider dtype (--dtype bfloat16 or float32), and " if code == "F16" else ""
        return (f"{wider}check the inputs for huge values: this method interpolates between them and has no scaling "
                "factor, so a merged value past the dtype's range comes from values near that range in a model")
    hint = _HINTS.get(code, _HINTS["F32"])
    if levers is not None:
        hint = hint.replace(_LAM_OR_WEIGHTS, levers).replace(_LAM, levers)
    return hint


_LAM = "a smaller lam (scaling factor)"
_LAM_OR_WEIGHTS = "a smaller lam (scaling factor) or smaller per-model weights"


# What helps depends on the dtype: float16 stops at 65504, so a wider dtype holds what a sensible merge
# makes; bfloat16, float32 and float64 reach 3.4e38 or more, where no sensible weight lies, so the cause
# is the scaling (or the inputs), and a wider dtype would only store the absurd values.
_WIDE = ("{dtype} already holds values up to {top}: a merged weight beyond that comes from the scaling, or from "
         "inputs near that limit (their sums inside the merge overflow float32 even where a mean would not), not "
         "the dtype; use a smaller lam (scaling factor) or smaller per-model weights, and check the inputs for huge "
         "values")  # (hp39 C47; hp44 c26: the tracker's id was in the hint)
_HINTS = {"F16": "float16 holds values up to 65504 only: write a wider dtype (--dtype bfloat16 or float32), "
                 "or use a smaller lam (scaling factor)",
          "BF16": _WIDE.format(dtype="bfloat16", top="3.4e38"),
          "F32": _WIDE.format(dtype="float32", top="3.4e38"),
          # merges compute in float32 whatever the output dtype: a value past float32's 3.4e38 is Inf before float64
          # stores it
          "F64": "the merge computes in float32 whatever the output dtype, so a merged value past float32's range "
                 "(3.4e38) overflows before float64 stores it; no sensible weight lies there: use a smaller lam "
                 "(scaling factor) or smaller per-model weights, and check the inputs for huge values"}


def check_fits_float8(name: str, values: Any, dtype: Any, offset: int = 0) -> None:
    """Before a cast to a float8 dtype (``dtype``: torch's): ``values`` (float32, torch) must be finite and within the
    dtype's range. torch's cast saturates (e4m3fn has no Inf: 768 is written as 448), so after it nothing would show
    the overflow; checked here instead, as the writer checks the other dtypes' bits."""
    _check_range(f"tensor {name!r}", values, dtype, offset, "the merged value",
                 "where a cast would silently clip it", "use a smaller lam")


def check_copy_fits(name: str, values: Any, dtype: Any) -> None:
    """Before a tensor copied from the base is cast to the output dtype (``dtype``: torch's; ``values``:
    float32 or wider, torch, finite: the executor refuses a copy holding NaN or Inf first): every value must
    stay within the dtype. A base weight past float16's 65504 would become Inf (float8: be clipped) with no
    merge to blame."""
    _check_range(f"tensor {name!r} (copied from the base, not merged)", values, dtype, 0, "its value",
                 "where the cast would overflow or clip it", "leave --dtype out to keep the base's dtype")


def _check_range(subject: str, values: Any, dtype: Any, offset: int, what: str, why: str, remedy: str) -> None:
    """``values`` (torch) all finite and within ``dtype``'s range, else an error naming ``subject`` and the first
    value past it."""
    import torch

    top = torch.finfo(dtype).max
    flat = values.detach().reshape(-1)
    bad = ~torch.isfinite(flat) | (flat.abs() > top)
    if not bool(bad.any()):
        return
    where = int(bad.nonzero()[0, 0])
    raise InvalidTensorError(
        f"{subject}: {what} at element {offset + where:,} is {float(flat[where]):.6g}, past the output dtype "
        f"{dtype} (largest value {top:g}, {why}); no merged model was written or returned",
        hint=f"write a wider dtype (--dtype bfloat16 or float32), or {remedy}")
