"""Model artifacts: the model id covers the manifest's content, so an edited manifest is refused."""

from __future__ import annotations

import json

import pytest

from patchaudit.errors import ArtifactError
from patchaudit.store.artifacts import MANIFEST_KEY, read_manifest, read_model_file, write_model
from patchaudit.store.objects import open_store


@pytest.fixture
def model_store(tmp_path):
    store = open_store(str(tmp_path / "model"))
    write_model(
        store,
        {"method": "toy", "threshold": 2.5, "calibration": {"n_images": 3}},
        {"data.bin": b"\x00\x01\x02"},
        id_prefix="toy-net",
    )
    return store


def _edit(store, **changes):
    manifest = json.loads(store.read_bytes(MANIFEST_KEY))
    manifest.update(changes)
    store.write_bytes(MANIFEST_KEY, json.dumps(manifest, indent=2).encode())


def test_written_manifest_reads_back_with_an_id_of_its_content(model_store, tmp_path):
    manifest = read_manifest(model_store)
    assert manifest["model_id"].startswith("toy-net-")
    assert read_model_file(model_store, manifest, "data.bin") == b"\x00\x01\x02"
    # Same content, same id; another threshold, another id.
    same = open_store(str(tmp_path / "same"))
    other = open_store(str(tmp_path / "other"))
    assert (
        write_model(
            same,
            {"method": "toy", "threshold": 2.5, "calibration": {"n_images": 3}},
            {"data.bin": b"\x00\x01\x02"},
            id_prefix="toy-net",
        )["model_id"]
        == manifest["model_id"]
    )
    assert (
        write_model(
            other,
            {"method": "toy", "threshold": 1000.0, "calibration": {"n_images": 3}},
            {"data.bin": b"\x00\x01\x02"},
            id_prefix="toy-net",
        )["model_id"]
        != manifest["model_id"]
    )


@pytest.mark.parametrize(
    "changes",
    [{"threshold": 1000}, {"calibration": {"n_images": 4}}, {"extra": 1}, {"model_id": "toy-net-000000000000"}],
)
def test_an_edited_manifest_is_refused(model_store, changes):
    _edit(model_store, **changes)
    with pytest.raises(ArtifactError, match="was edited after the model was written.*patchaudit fit"):
        read_manifest(model_store)


def test_a_manifest_of_an_older_schema_asks_for_a_refit(model_store):
    _edit(model_store, schema_version=1)
    with pytest.raises(ArtifactError, match="schema version 1 is not supported.*refit it with `patchaudit fit`"):
        read_manifest(model_store)
