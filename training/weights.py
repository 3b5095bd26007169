"""Weights in and out of the registry: ``tlreg import`` and ``tlreg export``.

Reading never executes code: safetensors files are parsed, torch files are loaded with
``weights_only=True`` and must hold a flat mapping of names to tensors.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tlreg.ckpt import AsyncCheckpointer
from tlreg.registry import CheckpointRecord, Registry, validate_name
from tlreg.registry.errors import BranchExists, BranchNotFound
from tlreg.storage_backends import Store, open_store
from tlreg.training.errors import WeightsFormatError
from tlreg.training.events import ProgressFactory, open_bar

_POLL_S = 0.2
"""How often an import's progress reads the save's live byte count."""

_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def read_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a ``.safetensors`` file, a torch state-dict file or a Hugging Face model folder.

    Returns ``(tensors, info)``; ``info`` records the source format and, for a Hugging Face
    folder, its ``config.json``.
    """
    p = Path(path)
    if p.is_dir():
        return _read_hf_folder(p)
    if not p.is_file():
        raise WeightsFormatError(f"{p}: no such file or folder")
    if p.suffix == ".safetensors":
        return _read_safetensors(p), {"format": "safetensors", "source": p.name}
    return _read_torch(p), {"format": "torch", "source": p.name}


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(p)))
    except Exception as e:  # SafetensorError, OSError: truncated or not safetensors at all
        raise WeightsFormatError(
            f"{p} is not a readable safetensors file ({str(e).splitlines()[0]}): re-export it"
        ) from None


def _read_torch(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsFormatError(_torch_refusal(p, e)) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsFormatError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise WeightsFormatError(
            f"{p}: entry {bad[0]!r} is not a named tensor; save model.state_dict()"
        )
    return dict(obj)


# what torch's weights-only unpickler names when it stops (torch 2.4 .. 2.13 wordings)
_UNPICKLER_GLOBAL = re.compile(
    r"(?:unsupported GLOBAL|Unsupported global: GLOBAL|Unsupported class)\s*:?\s*([\w.]+)"
)
_UNPICKLER_OPCODE = re.compile(r"Unsupported operand (\d+)")


def _torch_refusal(p: Path, error: Exception) -> str:
    """One line on why ``torch.load(p, weights_only=True)`` failed.

    torch raises an ``UnpicklingError`` (not imported here: no pickle module is) when the
    file's pickle needs more than tensors and plain containers, i.e. when loading it would
    import and call code; anything else means the file is not a torch file at all.
    """
    text = str(error)
    if text.startswith("Weights only load failed"):
        called, opcode = _UNPICKLER_GLOBAL.search(text), _UNPICKLER_OPCODE.search(text)
        what = (
            f" (its pickle calls {called[1]})"
            if called
            else f" (its pickle uses opcode {opcode[1]}, beyond plain tensors)"
            if opcode
            else ""
        )
        return (
            f"refused {p}: loading it would run code{what}; tlreg loads torch files only as "
            "plain tensors (torch.load with weights_only=True) - convert it to .safetensors"
        )
    first = next((line for line in text.splitlines() if line.strip()), type(error).__name__)
    return (
        f"{p} is not a torch state-dict file ({type(error).__name__}: {first.strip()[:300]}); "
        "save model.state_dict() with torch.save or convert it to .safetensors"
    )


def _read_hf_folder(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    info: dict[str, Any] = {"format": "huggingface", "source": p.name}
    config = p / "config.json"
    if config.is_file():
        try:
            info["config"] = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise WeightsFormatError(f"{config} is not valid JSON ({e})") from None
    if (p / "model.safetensors").is_file():
        return _read_safetensors(p / "model.safetensors"), info
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise WeightsFormatError(f"{index} has no weight_map ({e})") from None
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(_read_safetensors(p / shard))
        return tensors, info
    if (p / "pytorch_model.bin").is_file():
        return _read_torch(p / "pytorch_model.bin"), info
    raise WeightsFormatError(
        f"{p} is a folder without model weights: expected one of {', '.join(_HF_WEIGHT_FILES)}"
    )


def import_weights(
    path: str | os.PathLike[str],
    branch: str,
    *,
    registry: Registry,
    store: str | Store,
    task: str | None = None,
    progress: ProgressFactory | None = None,
) -> CheckpointRecord:
    """Store the weights at ``path`` as the root checkpoint of a new branch ``branch``.

    The weights are read and the name checked before anything is written; the checkpoint
    becomes visible only when the branch and its first commit exist. ``progress`` reports
    the bytes stored as they are (see :data:`~tlreg.training.events.ProgressFactory`).
    """
    validate_name(branch, "branch")
    try:
        registry.get_branch(branch)
        raise BranchExists(f"branch {branch!r} already exists: import under another --name")
    except BranchNotFound:
        pass
    tensors, info = read_weights(path)
    with AsyncCheckpointer(open_store(store)) as engine:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open_bar(progress, "import", total) as bar:
            pending = engine.save({"model": tensors, "extra": {"import": info}}, step=0)
            shown = 0
            while not pending.done():
                time.sleep(_POLL_S)
                done = pending.stats.bytes_done
                bar.update(done - shown)
                shown = done
            manifest_id, manifest = pending.result(), pending.manifest()
            bar.update(pending.stats.bytes_done - shown)
    registry.create_branch(branch, task=task)
    try:
        return registry.commit(
            branch,
            manifest_id,
            step=0,
            parents=[],
            objects=manifest.objects,
            logical_bytes=manifest.logical_bytes,
            kind="import",
            message=f"import {info['format']} {info['source']}",
            expected_head=None,
        )
    except BaseException:
        registry.delete_branch(branch)
        raise


def _named_tensors(model: object, record: CheckpointRecord) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping safetensors writes, each name with its own bytes."""
    if not isinstance(model, Mapping) or not model:
        raise WeightsFormatError(f"checkpoint {record.id[:12]} has no model tensors to export")
    tensors: dict[str, torch.Tensor] = {}
    shared: set[int] = set()
    for key, value in model.items():
        if type(key) is not str or not isinstance(value, torch.Tensor):
            raise WeightsFormatError(
                f"checkpoint {record.id[:12]}: model entry {str(key)[:80]!r} is not a named "
                "tensor; safetensors holds a flat mapping of names to tensors"
            )
        value = value.contiguous()
        if value.numel() and value.data_ptr() in shared:
            value = value.clone()  # tied weights: safetensors stores each name's own bytes
        shared.add(value.data_ptr())
        tensors[key] = value
    return tensors


def export_weights(
    ref: str,
    out: str | os.PathLike[str],
    *,
    registry: Registry,
    store: str | Store,
    progress: ProgressFactory | None = None,
) -> tuple[CheckpointRecord, int]:
    """Write the model tensors of checkpoint ``ref`` to a safetensors file ``out``, with
    the metadata ``{"format": "pt", "tlreg_checkpoint": ID, "branch": NAME}``: the file
    loads wherever a PyTorch ``model.safetensors`` does (``transformers``' ``from_pretrained``
    from a folder holding it and the model's ``config.json``).

    Returns the checkpoint and the number of tensors. The file appears atomically.
    ``progress`` reports the bytes read from the store as they arrive.
    """
    from safetensors.torch import save_file

    record = registry.resolve(ref)
    with AsyncCheckpointer(open_store(store)) as engine:
        entries = engine.manifest(record.manifest).tensors
        total = sum(e.nbytes for path, e in entries.items() if path.startswith("model/"))
        lock = threading.Lock()
        with open_bar(progress, "export", total) as bar:

            def read(nbytes: int) -> None:  # from the engine's I/O threads
                with lock:
                    bar.update(nbytes)

            try:
                model = engine.load(record.manifest, prefix="model", on_bytes=read).get("model")
            except KeyError:  # the state has no "model" entry
                model = None
            # checked inside the bar: a refused export prints its one error line, no progress
            tensors = _named_tensors(model, record)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # "format": "pt" is what torch's save_file writers put there (transformers' and
        # safetensors' own): transformers 4.x refuses a file without it.
        metadata = {"format": "pt", "tlreg_checkpoint": record.id, "branch": record.branch}
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return record, len(tensors)
