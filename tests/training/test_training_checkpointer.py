"""Checkpointer: the glue between the engine and the registry, without Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tlreg.ckpt import read_manifest
from tlreg.registry import HeadMoved, Registry
from tlreg.storage_backends import LocalStore, open_store
from tlreg.training import Checkpointer, CheckpointMismatch, load_task
from tlreg.training.examples.digits import lower, upper


def _train_a_bit(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    (x, y), _ = lower.datasets()
    for i in range(steps):
        opt.zero_grad()
        lower.loss(model(x[i * 16 : (i + 1) * 16]), y[i * 16 : (i + 1) * 16]).backward()
        opt.step()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def test_save_commits_in_order_and_restore_resumes_everything(
    registry: Registry, tmp_path: Path
) -> None:
    registry.create_branch("base")
    model = lower.build_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with Checkpointer("base", registry=registry, store=str(tmp_path / "store")) as ckpt:
        _train_a_bit(model, opt)
        first = ckpt.save(3, model=model, optimizer=opt, metrics={"loss": 1.5})
        _train_a_bit(model, opt)
        second = ckpt.save(6, model=model, optimizer=opt, extra={"epoch": 2, "betas": (0.9, 0.99)})
        ids = [first.result(), second.result()]
    assert [r.id for r in registry.log("base")] == ids[::-1]
    assert registry.get(ids[1]).parents == (ids[0],)
    assert registry.get(ids[0]).metrics == {"loss": 1.5}

    fresh = lower.build_model(1)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    extra: dict[str, object] = {}
    with Checkpointer("base", registry=registry, store=str(tmp_path / "store")) as ckpt:
        record = ckpt.restore(model=fresh, optimizer=fresh_opt, extra=extra)
        assert ckpt.last_restore.resumed
    assert record is not None and record.id == ids[1] and record.step == 6
    assert extra == {"epoch": 2, "betas": (0.9, 0.99)}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(_bits(a), _bits(b)), name
    for a, b in zip(
        opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values(), strict=True
    ):
        assert torch.equal(_bits(a["exp_avg"]), _bits(b["exp_avg"]))


def test_new_branch_transfers_matching_tensors_and_frozen_ones_cost_no_new_bytes(
    registry: Registry, tmp_path: Path
) -> None:
    store = str(tmp_path / "store")
    registry.create_branch("base")
    ancestor = lower.build_model(0)
    with Checkpointer("base", registry=registry, store=store) as ckpt:
        base_id = ckpt.save(1, model=ancestor).result()
    registry.create_branch("child", from_ref="base")

    model = upper.build_model(5)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("features."))
    with Checkpointer("child", registry=registry, store=store) as ckpt:
        record = ckpt.restore(model=model, reset=upper.reset)
        report = ckpt.last_restore
        with torch.no_grad():
            model.head.weight.add_(1.0)
        child_id = ckpt.save(1, model=model).result()
    assert record is not None and record.id == base_id and not report.resumed
    assert sorted(report.skipped) == ["head.bias", "head.weight"]
    assert all(n.startswith("features.") for n in report.transferred)

    s = open_store(store)
    base_objects = set(read_manifest(s, base_id).objects)
    child = read_manifest(s, child_id)
    features = [e for p, e in child.tensors.items() if p.startswith("model/features.")]
    assert features and all(e.object in base_objects for e in features)
    rec = registry.get(child_id)
    assert rec.parents == (base_id,)
    head_bytes = sum(e.nbytes for p, e in child.tensors.items() if not p.startswith("model/feat"))
    # New objects hold only the head and the RNG state (packed with 64-byte alignment).
    assert head_bytes <= rec.new_bytes < head_bytes + 64 * len(child.tensors)


def test_resume_into_a_model_of_another_shape_is_refused(
    registry: Registry, tmp_path: Path
) -> None:
    registry.create_branch("base")
    with Checkpointer("base", registry=registry, store=str(tmp_path / "s")) as ckpt:
        ckpt.save(1, model=lower.build_model(0)).result()
    wider = load_task("tlreg.training.examples.digits:lower")
    other = type(wider)(name="wide", classes=wider.classes, channels=8).build_model(0)
    with (
        Checkpointer("base", registry=registry, store=str(tmp_path / "s")) as ckpt,
        pytest.raises(CheckpointMismatch, match="does not fit the model"),
    ):
        ckpt.restore(model=other)


class _FailingStore(LocalStore):
    """A real local store whose object writes fail: injects a storage fault mid-save."""

    def put(self, key: str, data: object) -> None:  # type: ignore[override]
        if key.startswith("objects/"):
            raise OSError(28, "No space left on device")
        super().put(key, data)  # type: ignore[arg-type]


def test_failed_save_never_becomes_visible_and_training_goes_on(
    registry: Registry, tmp_path: Path
) -> None:
    registry.create_branch("base")
    model = lower.build_model(0)
    with Checkpointer("base", registry=registry, store=_FailingStore(tmp_path / "s")) as ckpt:
        pending = ckpt.save(1, model=model)
        with pytest.raises(OSError, match="No space left"):
            pending.result()
    assert registry.get_branch("base").head is None
    assert registry.checkpoints() == []
    assert not list(LocalStore(tmp_path / "s").list("manifests"))


def test_concurrent_writer_moving_the_head_makes_the_save_fail_with_head_moved(
    registry: Registry, tmp_path: Path
) -> None:
    store = str(tmp_path / "s")
    registry.create_branch("base")
    model = lower.build_model(0)
    with (
        Checkpointer("base", registry=registry, store=store) as a,
        Checkpointer("base", registry=registry, store=store) as b,
    ):
        first = a.save(1, model=model).result()
        with pytest.raises(HeadMoved):
            b.save(1, model=model).result()
    assert [r.id for r in registry.log("base")] == [first]


def test_lazy_save_lets_the_optimizer_step_only_after_staging(
    registry: Registry, tmp_path: Path
) -> None:
    registry.create_branch("base")
    model = lower.build_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with Checkpointer("base", registry=registry, store=str(tmp_path / "s"), lazy=True) as ckpt:
        ckpt.attach_optimizer(opt)
        pending = ckpt.save(1, model=model)
        _train_a_bit(model, opt, steps=1)  # mutates the weights in place right away
        assert pending.staged.done()
        saved = ckpt.engine.load(registry.get(pending.result()).manifest)["model"]
    for name, tensor in before.items():
        assert torch.equal(_bits(saved[name]), _bits(tensor)), name


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
    _train_a_bit(model, opt, steps=1)
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


def test_a_committed_save_gives_the_manifest_it_committed(
    registry: Registry, tmp_path: Path
) -> None:
    registry.create_branch("b")
    store = str(tmp_path / "s")
    with Checkpointer("b", registry=registry, store=store) as ckpt:
        pending = ckpt.save(1, model=lower.build_model(0))
        manifest = pending.manifest()
    assert manifest.id == pending.result() == registry.resolve("b").manifest
    assert manifest.to_json() == read_manifest(open_store(store), manifest.id).to_json()


def test_a_restore_of_an_unknown_ref_leaves_the_expected_head_alone(
    registry: Registry, tmp_path: Path
) -> None:
    from tlreg.registry import RefNotFound

    registry.create_branch("b")
    store = str(tmp_path / "s")
    model = lower.build_model(0)
    with (
        Checkpointer("b", registry=registry, store=store) as mine,
        Checkpointer("b", registry=registry, store=store) as other,
    ):
        other.save(1, model=model).result()  # the head moves under `mine`
        with pytest.raises(RefNotFound):
            mine.restore(checkpoint="no-such-ref", model=model)
        with pytest.raises(HeadMoved):
            mine.save(2, model=model).result()
