"""A checkpoint view opens in xarray and dask, as their users open any Zarr v3 store, and
reads every tensor bit for bit, from a local store and from the S3 server."""

from __future__ import annotations

import warnings
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

from tlreg.ckpt import AsyncCheckpointer
from tlreg.ckpt.view import CheckpointStore
from tlreg.storage_backends import open_store


def _model() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "features.0.weight": torch.randn(16, 3, 3, 3),
        "features.0.bias": torch.zeros(16),  # zeros: the fill value must not mask them
        "features.1.weight": torch.randn(16).to(torch.bfloat16),
        "head.weight": torch.randn(10, 16, dtype=torch.float64),
        "head.index": torch.tensor([0, -3, 0, 7]),
        "head.mask": torch.tensor([True, False, True]),
        "head.scale": torch.tensor(0.5, dtype=torch.float16),  # 0-d
        "embed.weight": torch.randn(300, 64),  # several chunks at chunk_bytes=4096
    }


def _as_numpy(t: torch.Tensor) -> np.ndarray[Any, Any]:
    """What the view holds: the tensor, or its raw bits for a dtype numpy lacks."""
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


@pytest.fixture
def view(store_url: str) -> tuple[CheckpointStore, dict[str, torch.Tensor]]:
    store = open_store(store_url)
    model = _model()
    with AsyncCheckpointer(store) as engine:
        manifest_id = engine.save({"model": model, "step": torch.tensor(3)}, step=3).result()
    return CheckpointStore(store, manifest_id, chunk_bytes=4096), model


def test_xarray_opens_the_model_group_as_a_dataset_of_its_tensors(
    view: tuple[CheckpointStore, dict[str, torch.Tensor]],
) -> None:
    store, model = view
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback from consolidated metadata, no other
        ds = xr.open_zarr(store, group="model", zarr_format=3)
    assert sorted(ds.data_vars) == sorted(model)
    for name, tensor in model.items():
        variable = ds[name]
        assert variable.dims == tuple(f"{name}#{axis}" for axis in range(tensor.ndim))
        assert variable.attrs["tlreg"]["torch_dtype"] == str(tensor.dtype).removeprefix("torch.")
        values = variable.values
        assert values.dtype == _as_numpy(tensor).dtype, name
        assert np.array_equal(values, _as_numpy(tensor)), name
    part = ds["embed.weight"].isel({"embed.weight#0": slice(100, 140)}).values
    assert np.array_equal(part, model["embed.weight"][100:140].numpy())


def test_dask_reads_each_tensor_chunk_by_chunk(
    view: tuple[CheckpointStore, dict[str, torch.Tensor]],
) -> None:
    store, model = view
    with dask.config.set(scheduler="threads"):
        for name, tensor in model.items():
            array = da.from_zarr(store, component=f"model/{name}")
            assert array.shape == tuple(tensor.shape)
            assert np.array_equal(array.compute(), _as_numpy(tensor)), name
        big = da.from_zarr(store, component="model/embed.weight")
        assert big.numblocks[0] > 1  # really chunked: 300 rows of 256 bytes, 4096 per chunk
        total = float(big.sum().compute())
    assert total == pytest.approx(float(model["embed.weight"].double().sum()), rel=1e-6)
