"""Torch dtypes by name, and the raw bytes of a tensor.

Tensors are stored as their raw bits, so every dtype whose elements are whole bytes
round-trips exactly; the manifest records the dtype by the name used here.
"""

from __future__ import annotations

import torch

# Whole-byte dtypes with a CPU copy kernel. Sub-byte dtypes (int1..int7, uint1..uint7) have
# no storage layout of their own and quantized dtypes carry scales outside their bytes, so
# neither can be stored as raw bits.
_NAMES = (
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
)

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in _NAMES
    if isinstance(getattr(torch, name, None), torch.dtype)
}
"""Every dtype that can be stored, by its manifest name."""

_BY_DTYPE: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest name of ``dtype``; ``TypeError`` if it cannot be stored as raw bytes."""
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise TypeError(
            f"dtype {dtype} cannot be checkpointed as raw bytes; convert the tensor to one of "
            f"{', '.join(DTYPES)}"
        ) from None


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype a manifest calls ``name``; ``KeyError`` if this torch lacks it."""
    return DTYPES[name]


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the tensor's elements (not of its storage)."""
    return tensor.numel() * tensor.element_size()


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (0-d and empty tensors included)."""
    return tensor.reshape(-1).view(torch.uint8)


def from_bytes(data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """View flat uint8 ``data`` as a tensor of ``dtype`` and ``shape`` (no copy)."""
    return data.view(dtype).reshape(shape)
