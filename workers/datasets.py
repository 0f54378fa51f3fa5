"""Finding images in a store: MVTec-AD-style category folders, or a plain folder of images.

MVTec layout: `train/good/*`, `test/<type>/*` (`good` = normal), masks at
`ground_truth/<type>/<stem>_mask.png`. Anything else is treated as a flat folder of images.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

from patchaudit.errors import PatchauditError
from patchaudit.store.objects import FileStore, ObjectStore

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(PatchauditError):
    """The data folder does not hold what the command needs."""


@dataclass(frozen=True)
class TestItem:
    key: str
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images
    mask_key: str | None = None


@dataclass
class Dataset:
    uri: str
    name: str
    train_keys: list[str] = field(default_factory=list)
    test: list[TestItem] = field(default_factory=list)


def list_images(store: ObjectStore, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix, extensions=IMAGE_EXTENSIONS)]


def discover(store: ObjectStore) -> Dataset:
    if isinstance(store, FileStore) and not os.path.isdir(store.root):
        raise DatasetError(f"data folder does not exist: {store.root}")
    name = posixpath.basename(store.uri.rstrip("/")) or store.uri
    train = list_images(store, "train/good/")
    if not train:
        keys = list_images(store)
        return Dataset(store.uri, name, train_keys=keys)
    masks = {info.key for info in store.list("ground_truth/", extensions=IMAGE_EXTENSIONS)}
    test = []
    for key in list_images(store, "test/"):
        parts = key.split("/")
        if len(parts) != 3:
            continue
        defect = parts[1]
        stem = posixpath.splitext(parts[2])[0]
        mask_key = f"ground_truth/{defect}/{stem}_mask.png"
        test.append(TestItem(key, 0 if defect == "good" else 1, defect, mask_key if mask_key in masks else None))
    return Dataset(store.uri, name, train_keys=train, test=test)


def require_train(ds: Dataset) -> list[str]:
    if not ds.train_keys:
        raise DatasetError(
            f"no training images found under {ds.uri} (expected train/good/*.png|jpg or a folder of images; "
            f"extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return ds.train_keys


def require_test(ds: Dataset) -> list[TestItem]:
    if not ds.test:
        raise DatasetError(f"no test images found under {ds.uri} (expected test/<good|defect>/*)")
    labels = {t.label for t in ds.test}
    if labels != {0, 1}:
        raise DatasetError(f"test set at {ds.uri} needs both good and defective images to compute metrics")
    return ds.test
