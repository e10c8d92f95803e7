"""What README.md tells a user to type or copy must work: its model.yaml snippets load, and its
list of presets and count of shipped profiles are the real ones. No torch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from planner.hardware.profile import shipped_profile_names
from planner.model.modelfile import load_model_file
from planner.model.presets import preset_names

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def model_files() -> list[str]:
    """The ```yaml blocks that are whole model files (a top-level `model:` key)."""
    return [b for b in re.findall(r"```yaml\n(.*?)```", README, flags=re.S) if re.search(r"^model:", b, re.M)]


@pytest.mark.parametrize("block", model_files())
def test_model_yaml_snippets_load(tmp_path, block):
    path = tmp_path / "model.yaml"
    path.write_text(block)
    assert load_model_file(str(path)).spec.layers > 0


def test_model_yaml_snippets_are_found():
    assert len(model_files()) >= 2


def test_preset_list_is_exactly_the_presets():
    listed = README.split("The\npresets are exactly these", 1)[1].split("There is no", 1)[0]
    assert set(re.findall(r"`([a-z0-9.-]+)`", listed)) == set(preset_names())


def test_shipped_profile_count():
    assert f"prints all {len(shipped_profile_names())} with their key figures" in README
