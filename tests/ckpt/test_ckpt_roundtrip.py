"""Whatever goes into save() comes out of load() with the same nesting, types and bits."""

from __future__ import annotations

import collections
import math
import random
from collections import OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlreg.ckpt import AsyncCheckpointer, flatten_state, unflatten_state
from tlreg.ckpt.dtypes import DTYPES


def test_model_optimizer_scheduler_rng_and_extra_round_trip_exactly(ckpt, model_factory, same):
    model = model_factory()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()
        sched.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "extra": {
            "epoch": 3,
            "best": float("inf"),
            "worst": float("-inf"),
            "undefined": float("nan"),
            "neg_zero": -0.0,
            "pos": (1, 2, ("nested", None)),
            "by_id": {0: "a", 7: [1.5, True], -1: b"\x00\xff"},
            "$literal": "a key that looks like a tag",
            "size": torch.Size([2, 3]),
            "dtype": torch.bfloat16,
            "huge": 2**100,
        },
    }
    pending = ckpt.save(state, step=3, metadata={"loss": 0.25})
    manifest_id = pending.result()

    loaded = ckpt.load(manifest_id)

    same(state, loaded)
    assert type(loaded["model"]) is OrderedDict
    assert type(loaded["optimizer"]["state"]) is dict
    assert list(loaded["optimizer"]["state"]) == [0, 1, 2, 3, 4, 5]
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert "optimizer/state/3/exp_avg" in ckpt.manifest(manifest_id).tensors
    assert ckpt.manifest(manifest_id).step == 3
    assert ckpt.manifest(manifest_id).metadata == {"loss": 0.25}
    # the loaded state drives real objects again
    model2 = model_factory(seed=1)
    model2.load_state_dict(loaded["model"])
    opt2 = torch.optim.Adam(model2.parameters())
    opt2.load_state_dict(loaded["optimizer"])
    random.setstate(loaded["rng"]["python"])
    torch.set_rng_state(loaded["rng"]["torch"])


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    count = math.prod(shape)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_round_trips_bit_exactly(ckpt, same, name):
    dtype = DTYPES[name]
    base = _random_tensor(dtype, (5, 6))
    state = {
        "plain": base,
        "transposed": base.t(),  # non-contiguous
        "strided": base[::2, 1::3],
        "scalar": _random_tensor(dtype, (), seed=1),  # 0-d
        "empty": _random_tensor(dtype, (0, 4)),
    }
    loaded = ckpt.load(ckpt.save(state).result())
    same(state, loaded)
    entries = ckpt.manifest(ckpt.save(state).result()).tensors
    assert entries["scalar"].shape == () and entries["scalar"].dtype == name
    assert entries["empty"].nbytes == 0 and entries["empty"].object == ""


def test_prefix_loads_only_that_branch_keeping_its_nesting(ckpt, model_factory, same):
    model = model_factory()
    state = {"model": model.state_dict(), "extra": {"epoch": 1, "w": torch.ones(3)}}
    manifest_id = ckpt.save(state).result()

    only_model = ckpt.load(manifest_id, prefix="model")
    only_bias = ckpt.load(manifest_id, prefix="model/3.bias")

    same({"model": state["model"]}, only_model)
    same({"model": OrderedDict([("3.bias", state["model"]["3.bias"])])}, only_bias)
    with pytest.raises(KeyError, match="nope"):
        ckpt.load(manifest_id, prefix="model/nope")


class _Opaque:
    pass


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"a": {"b": [1, _Opaque()]}}, "a/b/1"),
        ({"opt": {"state": {3: {"fn": print}}}}, "opt/state/3/fn"),
        ({"s": {1, 2}}, "s"),
        ({"p": Point(1, 2)}, "p"),
        ({"d": collections.defaultdict(list)}, "d"),
        ({"k": {torch.ones(1): 1}}, "k/tensor"),
        ({"sparse": torch.eye(3).to_sparse()}, "sparse"),
        ({"q": torch.empty(2, dtype=torch.int4) if hasattr(torch, "int4") else _Opaque()}, "q"),
    ],
)
def test_non_encodable_state_raises_type_error_naming_the_path(ckpt, state, path):
    with pytest.raises(TypeError, match=f"at '{path}"):
        ckpt.save(state)
    assert list(ckpt.store.list("manifests")) == []


def test_a_state_that_contains_itself_is_refused():
    cycle: dict = {"a": []}
    cycle["a"].append(cycle)
    with pytest.raises(TypeError, match="cycle at 'a/0'"):
        flatten_state(cycle)


def test_metadata_must_be_plain_json(ckpt):
    with pytest.raises(TypeError, match="metadata must be plain JSON"):
        ckpt.save({"x": 1}, metadata={"when": object()})
    with pytest.raises(TypeError, match="metadata must be plain JSON"):
        ckpt.save({"x": 1}, metadata={1: "int key"})


def test_colliding_paths_get_distinct_tensor_entries(ckpt, same):
    state = {"a": {3: torch.zeros(2), "3": torch.ones(2)}, "a/3": torch.full((2,), 7.0)}
    tree, tensors = flatten_state(state)
    assert list(tensors) == ["a/3", "a/3~1", "a/3~2"]
    same(state, unflatten_state(tree, tensors))
    same(state, ckpt.load(ckpt.save(state).result()))


# -- random trees -------------------------------------------------------------------------

_dtypes = st.sampled_from([DTYPES[n] for n in sorted(DTYPES)])
_shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)
_tensors = st.builds(_random_tensor, _dtypes, _shapes, st.integers(0, 2**16))
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_keys = st.text(max_size=6) | st.integers(-5, 5)
_values = st.recursive(
    _scalars | _tensors,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(_keys, inner, max_size=4)
        | st.dictionaries(st.text(max_size=4), inner, max_size=3).map(OrderedDict)
    ),
    max_leaves=12,
)
_states = st.dictionaries(st.text(max_size=6), _values, max_size=5)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(state=_states)
def test_random_trees_flatten_and_unflatten_exactly(same, state):
    tree, tensors = flatten_state(state)
    same(state, unflatten_state(tree, tensors))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(state=_states)
def test_random_trees_round_trip_through_the_store(store, same, state):
    with AsyncCheckpointer(store) as checkpointer:
        same(state, checkpointer.load(checkpointer.save(state).result()))
