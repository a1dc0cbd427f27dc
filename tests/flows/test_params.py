"""The flow's parameter model: what the CLI, the deployments and the UI's form share."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.params import ScoreParams
from loaders.manifest import Manifest


def _inline(path: str) -> Manifest:
    return Manifest.model_validate({"id_column": "id", "features": ["a"],
                                    "models": [{"name": "m", "path": path}]})


def test_a_manifest_path_or_an_inline_manifest_exactly(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert ScoreParams(models="m.yaml", input="in", output="out").models == "m.yaml"
    monkeypatch.chdir(tmp_path)
    inline = ScoreParams(manifest=_inline("ckpt/model.ckpt"), input="in", output="out")
    assert inline.load_manifest().models[0].path == str(tmp_path / "ckpt" / "model.ckpt")
    for wrong in ({}, {"models": "  "}, {"models": "m.yaml", "manifest": _inline("x")}):
        with pytest.raises(ValidationError, match="exactly one of 'models'"):
            ScoreParams(input="in", output="out", **wrong)  # type: ignore[arg-type]


def test_the_form_shows_a_text_box_for_the_manifest_path() -> None:
    """A plain string in the JSON schema: no choice of types opening on "None"."""
    prop = ScoreParams.model_json_schema()["properties"]["models"]
    assert prop["type"] == "string" and "anyOf" not in prop
    assert "Required, unless" in prop["description"]
