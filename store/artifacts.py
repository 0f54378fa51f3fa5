"""Model artifacts: a prefix holding `manifest.json` plus data files (faiss shards, .npy arrays).

Data files are written first, each atomically, and recorded in the manifest with size and sha256;
the manifest is written last, so a model is visible only once it is complete. The model id ends in
a digest of the manifest's whole content (files table, threshold, calibration, config, ... all but
the id itself), so an edited manifest (say, a new threshold) no longer matches its id and is
refused: a different model needs a new fit, and so a new id. Loading checks the schema version,
the manifest's digest and every file's size and checksum. Nothing is ever unpickled: arrays go through
`np.save/np.load(allow_pickle=False)` and faiss indexes through faiss's own serializer.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from patchaudit.errors import ArtifactError, ObjectNotFound
from patchaudit.store.objects import ObjectStore

MANIFEST_KEY = "manifest.json"
# 2: the model id covers the manifest's content (1: it covered the data files and the threshold only).
SCHEMA_VERSION = 2
DIGEST_CHARS = 12  # hex digits of the manifest digest at the end of a model id


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def array_to_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def array_from_bytes(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise ArtifactError(f"array file is not a plain .npy array: {exc}") from None


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's content without its `model_id`, as canonical JSON (sorted keys)."""
    body = {k: v for k, v in manifest.items() if k != "model_id"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_model(
    store: ObjectStore, manifest: Mapping[str, Any], files: Mapping[str, bytes], id_prefix: str = "model"
) -> dict[str, Any]:
    """Write `files` then `manifest.json` (with a `files` table of sizes and checksums) under `store`.

    The manifest's `model_id` is set here: `<id_prefix>-<digest of the manifest's content>`.
    Returns the manifest as written.
    """
    if MANIFEST_KEY in files:
        raise ArtifactError(f"{MANIFEST_KEY} is reserved")
    # A half-written model must not look complete: drop any old manifest before touching data files.
    if store.exists(MANIFEST_KEY):
        store.delete(MANIFEST_KEY)
    table = {}
    for name, data in files.items():
        store.write_bytes(name, data)
        table[name] = {"size": len(data), "sha256": sha256_bytes(data)}
    full = dict(manifest)
    full["schema_version"] = SCHEMA_VERSION
    full["files"] = table
    full.pop("model_id", None)
    full = json.loads(json.dumps(full))  # the digest is of what a reader will parse (tuples as lists, ...)
    full["model_id"] = f"{id_prefix}-{manifest_digest(full)[:DIGEST_CHARS]}"
    store.write_bytes(MANIFEST_KEY, json.dumps(full, indent=2, sort_keys=True).encode())
    return full


def read_manifest(store: ObjectStore) -> dict[str, Any]:
    try:
        raw = store.read_bytes(MANIFEST_KEY)
    except ObjectNotFound:
        raise ArtifactError(
            f"no model at {store.uri}: {MANIFEST_KEY} is missing (was `patchaudit fit` run with --out here?)"
        ) from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{store.uri_for(MANIFEST_KEY)} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{store.uri_for(MANIFEST_KEY)} must hold a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        older = isinstance(version, int) and not isinstance(version, bool) and version < SCHEMA_VERSION
        raise ArtifactError(
            f"model manifest schema version {version!r} is not supported (this patchaudit reads {SCHEMA_VERSION})"
            + ("; the model was fitted by an older patchaudit: refit it with `patchaudit fit`" if older else "")
        )
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{store.uri_for(MANIFEST_KEY)} has no 'files' table")
    model_id = manifest.get("model_id")
    digest = manifest_digest(manifest)[:DIGEST_CHARS]
    if not isinstance(model_id, str) or not model_id.endswith("-" + digest):
        raise ArtifactError(
            f"{store.uri_for(MANIFEST_KEY)} does not match its model id {model_id!r}: the manifest was edited "
            "after the model was written (threshold, config, files, ...). An edited model is refused; to "
            "change a model, fit a new one with `patchaudit fit` (it gets its own id)"
        )
    return manifest


def read_model_file(store: ObjectStore, manifest: Mapping[str, Any], name: str) -> bytes:
    """Read one data file of the model and verify it against the manifest."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise ArtifactError(f"model at {store.uri} has no file {name!r} in its manifest")
    try:
        data = store.read_bytes(name)
    except ObjectNotFound:
        raise ArtifactError(f"model file {store.uri_for(name)} is listed in the manifest but missing") from None
    if len(data) != entry["size"] or sha256_bytes(data) != entry["sha256"]:
        raise ArtifactError(
            f"model file {store.uri_for(name)} does not match its manifest checksum (corrupt or partly written)"
        )
    return data


def arrays_to_files(arrays: Mapping[str, np.ndarray], prefix: str) -> tuple[list[str], dict[str, bytes]]:
    """Named arrays as `.npy` model files `<prefix><name>.npy`; returns (sorted names, files)."""
    files = {f"{prefix}{name}.npy": array_to_bytes(a) for name, a in arrays.items()}
    return sorted(arrays), files


def arrays_from_files(
    store: ObjectStore, manifest: Mapping[str, Any], names: list[str], prefix: str
) -> dict[str, np.ndarray]:
    """The arrays `arrays_to_files` wrote, each verified against the manifest."""
    return {n: array_from_bytes(read_model_file(store, manifest, f"{prefix}{n}.npy")) for n in names}


def verify_model(store: ObjectStore, manifest: Mapping[str, Any]) -> None:
    """Check every data file of the model against its manifest (size and sha256), one file at a time.

    The scheduler calls it before starting any actor, so a corrupt or partly copied model is refused
    with its cause instead of failing inside every worker.
    """
    for name in sorted(manifest["files"]):
        read_model_file(store, manifest, name)
