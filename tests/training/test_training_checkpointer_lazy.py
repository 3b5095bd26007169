"""Checkpointer: lazy saves hold the state at ``save()``, restore reads once, nothing leaks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tlreg.registry import Registry
from tlreg.training import Checkpointer
from tlreg.training.examples.digits import lower


def _sixteen_layers() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(16)])


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(8, 512)).square().mean().backward()
    opt.step()


def test_lazy_save_with_an_optimizer_holds_the_state_at_save_when_the_loop_steps_at_once(
    registry: Registry, tmp_path: Path
) -> None:
    # What a user's own loop does: save(model=, optimizer=), then opt.step() straight away,
    # with no attach_optimizer call. The step must wait for the background copy.
    registry.create_branch("lazy")
    model = _sixteen_layers()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _step(model, opt)  # the optimizer has state and every parameter a gradient
    expected: list[dict[str, torch.Tensor]] = []
    pendings = []
    with Checkpointer("lazy", registry=registry, store=str(tmp_path / "s"), lazy=True) as ckpt:
        for step in range(5):
            expected.append({k: v.clone() for k, v in model.state_dict().items()})
            pendings.append(ckpt.save(step, model=model, optimizer=opt))
            _step(model, opt)  # mutates all 32 tensors in place at once
        ids = [p.result() for p in pendings]
        torn = []
        for step, (checkpoint_id, state) in enumerate(zip(ids, expected, strict=True)):
            saved = ckpt.engine.load(registry.get(checkpoint_id).manifest)["model"]
            torn += [f"{step}:{k}" for k, v in state.items() if not torch.equal(saved[k], v)]
    assert torn == []


def test_lazy_saves_attach_the_optimizer_hook_once(registry: Registry, tmp_path: Path) -> None:
    registry.create_branch("lazy")
    model = lower.build_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Checkpointer("lazy", registry=registry, store=str(tmp_path / "s"), lazy=True) as ckpt:
        for step in range(3):
            ckpt.save(step, model=model, optimizer=opt).result()
        assert len(opt._optimizer_step_pre_hooks) == 1
    assert len(opt._optimizer_step_pre_hooks) == 0  # close() removes it


class _SelfCopies(TorchDispatchMode):
    """Counts ``copy_`` calls whose source is the destination's own memory."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            if dst.data_ptr() == src.data_ptr() and dst.shape == src.shape:
                self.count += 1
        return func(*args, **(kwargs or {}))


def test_resuming_restore_reads_the_model_in_place_without_copying_it_onto_itself(
    registry: Registry, tmp_path: Path
) -> None:
    registry.create_branch("base")
    model = lower.build_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _step_digits(model, opt)
    store = str(tmp_path / "s")
    with Checkpointer("base", registry=registry, store=store) as ckpt:
        ckpt.save(1, model=model, optimizer=opt).result()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = lower.build_model(1)
    pointers = {k: v.data_ptr() for k, v in fresh.state_dict().items()}
    with Checkpointer("base", registry=registry, store=store) as ckpt, _SelfCopies() as copies:
        ckpt.restore(model=fresh, optimizer=torch.optim.Adam(fresh.parameters(), lr=1e-2))
    assert copies.count == 0
    assert {k: v.data_ptr() for k, v in fresh.state_dict().items()} == pointers
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert ckpt.last_restore.resumed and len(ckpt.last_restore.transferred) == len(saved)


def _step_digits(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    (x, y), _ = lower.datasets()
    opt.zero_grad()
    lower.loss(model(x[:16]), y[:16]).backward()
    opt.step()


def test_for_branch_closes_the_registry_it_opened(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("TLREG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TLREG_REGISTRY_URL", raising=False)
    monkeypatch.delenv("TLREG_STORE_URL", raising=False)
    from tlreg.training.config import load_settings

    with Registry(load_settings().registry_url) as registry:
        registry.create_branch("b")
    closed: list[str] = []
    monkeypatch.setattr(Registry, "close", lambda self: closed.append(self.url))
    with Checkpointer.for_branch("b") as ckpt:
        ckpt.save(1, model=lower.build_model(0)).result()
        assert closed == []
    assert closed == [ckpt.registry.url]


def test_a_registry_passed_in_stays_open_after_close(registry: Registry, tmp_path: Path) -> None:
    registry.create_branch("b")
    with Checkpointer("b", registry=registry, store=str(tmp_path / "s")) as ckpt:
        first = ckpt.save(1, model=lower.build_model(0)).result()
    assert registry.resolve("b").id == first  # still usable
