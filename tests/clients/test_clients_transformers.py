"""``tlreg export`` writes a file Hugging Face's transformers loads: all-MiniLM-L6-v2 imported,
exported from a local store and from the S3 server, and loaded with ``from_pretrained`` by the
oldest and the newest transformers that run here, embeds exactly as the original does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from client_sites import client_site, run_client
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tlreg.cli.main import cli
from tlreg.training.examples.minilm import minilm_folder

pytestmark = pytest.mark.slow

TRANSFORMERS_VERSIONS = ["4.23.0", "5.25.0"]
"""The oldest transformers with a wheel of every dependency for this Python (older ones need
tokenizers < 0.13, which has no wheel for Python 3.11 and no Rust here to build it) and the
newest on PyPI when this was written; both run on torch 2.13. 4.x refuses a safetensors file
whose metadata lacks ``"format": "pt"``."""

# all-MiniLM-L6-v2's cosine similarities as printed by sentence-transformers' quickstart
# (the same sentences as minilm_embed.py; see tests/training/test_training_minilm.py)
PUBLISHED = [(3, 6, 0.8939), (0, 4, 0.6788), (2, 7, 0.5096), (1, 4, 0.2105), (0, 5, 0.1310)]


def _export(store_url: str, home: Path, out: Path) -> Path:
    """Import the MiniLM folder into a fresh home on ``store_url`` and ``tlreg export`` it into
    a model folder ``out``: the exported weights beside the original's config and tokenizer."""
    runner = CliRunner()
    base = ["--home", str(home), "--registry", f"sqlite:///{home / 'registry.db'}"]
    base += ["--store", store_url]
    for args in (["init"], ["import", str(minilm_folder()), "--name", "minilm"]):
        result = runner.invoke(cli, base + args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    out.mkdir(parents=True)
    result = runner.invoke(
        cli, [*base, "export", "minilm", str(out / "model.safetensors")], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    for f in minilm_folder().iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.s3
@pytest.mark.parametrize("version", TRANSFORMERS_VERSIONS)
def test_an_exported_minilm_loads_in_transformers_and_embeds_as_the_original(
    version: str, s3_bucket_url: str, tmp_path: Path
) -> None:
    """One subprocess per version loads the original, the exports from a local store and
    from the S3 server, and an export without "format" (what tlreg wrote before issue 20)."""
    site = client_site("transformers", version)
    exports = [
        _export(url, tmp_path / f"home-{name}", tmp_path / f"exported-{name}")
        for name, url in (("local", str(tmp_path / "store")), ("s3", s3_bucket_url))
    ]
    for folder in exports:
        with safe_open(folder / "model.safetensors", "pt") as f:
            assert f.metadata()["format"] == "pt"
            assert f.metadata()["branch"] == "minilm"
    unmarked = tmp_path / "unmarked"
    shutil.copytree(exports[0], unmarked)
    save_file(load_file(exports[0] / "model.safetensors"), unmarked / "model.safetensors")
    folders = [minilm_folder(), *exports, unmarked]
    out = json.loads(
        run_client(site, Path(__file__).with_name("minilm_embed.py"), *map(str, folders))
    )
    assert out["version"] == version
    original, from_local, from_s3, without_format = out["embeddings"]
    assert isinstance(original, list), original
    assert from_local == original  # bit for bit: the same weights through the same code
    assert from_s3 == original
    for a, b, score in PUBLISHED:
        cosine = sum(x * y for x, y in zip(from_s3[a], from_s3[b], strict=True))
        assert cosine == pytest.approx(score, abs=2e-4)
    if version.startswith("4."):  # what the metadata is for: 4.x refuses the file
        assert isinstance(without_format, str), "transformers 4 loaded a file without format"
    else:
        assert without_format == original
