"""Fixtures for the checkpoint engine tests: a real on-disk store and exact comparisons."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tlreg.ckpt import AsyncCheckpointer
from tlreg.ckpt.staging import Stager
from tlreg.storage_backends import LocalStore, Store, open_store


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes, so NaN payloads and -0.0 compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_identical(a: Any, b: Any, where: str = "<root>") -> None:
    """``a`` and ``b`` have the same nesting, exact Python types, and bit-equal tensors."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device.type) == (b.dtype, b.shape, "cpu"), where
        assert torch.equal(bits(a), bits(b)), f"{where}: tensor bytes differ"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for ka, kb in zip(a, b, strict=True):
            assert_identical(ka, kb, f"{where}/{ka}")
            assert_identical(a[ka], b[kb], f"{where}/{ka}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def snapshot(state: Any) -> Any:
    """A deep copy of a state whose tensors are cloned (to compare against later)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return type(state)((k, snapshot(v)) for k, v in state.items())
    if isinstance(state, list | tuple):
        return type(state)(snapshot(v) for v in state)
    return state


@pytest.fixture
def same() -> Callable[[Any, Any], None]:
    """``same(a, b)`` asserts identical nesting, types and tensor bits."""
    return assert_identical


@pytest.fixture
def clone() -> Callable[[Any], Any]:
    """``clone(state)``: a snapshot with cloned tensors."""
    return snapshot


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(str(tmp_path / "store"))


@pytest.fixture
def ckpt(store: Store) -> Iterator[AsyncCheckpointer]:
    with AsyncCheckpointer(store) as checkpointer:
        yield checkpointer


class GatedStore(LocalStore):
    """A local store whose puts wait for ``gate`` and report to ``on_put`` first."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()
        self.on_put: Callable[[str], None] | None = None

    def put(self, key: str, data: Any) -> None:
        if self.on_put is not None:
            self.on_put(key)
        self.gate.wait()
        super().put(key, data)


@pytest.fixture
def gated_store(tmp_path: Path) -> GatedStore:
    """A store whose writes can be held back (``.gate.clear()``) to observe the pipeline."""
    gated = GatedStore(str(tmp_path / "gated"))
    yield gated
    gated.gate.set()


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )


@pytest.fixture
def model_factory() -> Callable[..., torch.nn.Module]:
    """``model_factory(seed)``: a small MLP (backbone 0..1, head 3)."""
    return make_model


class HeldCopy:
    """Every staging copy waits for :attr:`release`: a lazy save stays unstaged until then."""

    def __init__(self) -> None:
        self.copying = threading.Event()
        self.release = threading.Event()

    def step_waiting(self, opt: torch.optim.Optimizer) -> threading.Thread:
        """``opt.step()`` started in a thread, checked to be waiting for the held copy."""
        stepper = threading.Thread(target=opt.step)
        stepper.start()
        self.copying.wait()
        stepper.join(timeout=0.2)
        assert stepper.is_alive(), "optimizer.step() ran before the state was staged"
        return stepper


@pytest.fixture
def held_copy(monkeypatch: pytest.MonkeyPatch) -> HeldCopy:
    """Hold back every staging copy (see :class:`HeldCopy`)."""
    held = HeldCopy()
    original_copy = Stager.copy

    def copy(self: Stager, *args: Any) -> None:
        held.copying.set()
        held.release.wait()
        original_copy(self, *args)

    monkeypatch.setattr(Stager, "copy", copy)
    return held
