"""`images`: a site's folder of images, one sub-folder per class (PNG or JPEG, read with
Pillow), and a small CNN.

The schema is part of the job (`[task] classes`, `image_size = [H, W]`, `channels`); every
image is converted to grey (1 channel) or RGB (3) and resized to H x W, pixels / 255. A
site whose folder holds a class the job does not name gets one clear line, and nothing is
sent. `fedcore simulate --task images --data FOLDER` infers the schema from the folder (the
classes its sub-folders name, the first image's size and mode) and splits it: 20% held out,
stratified, for the server's accuracy; the rest partitioned across the virtual sites. A
deployed site holds out 20% of its own folder (stratified, fixed seed) for federated
evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from fedcore.tasks.base import Dataset
from fedcore.tasks.bundled import OwnDataTask

EXTENSIONS = (".png", ".jpg", ".jpeg")


def infer_schema(folder: Path) -> dict[str, Any]:
    """classes, image_size and channels of an image folder (for simulate)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    images = [f for c in classes for f in sorted((folder / c).iterdir()) if f.suffix.lower() in EXTENSIONS]
    if not images:
        raise ValueError(f"{folder}: no class sub-folders with .png/.jpg images")
    from PIL import Image

    with Image.open(images[0]) as first:
        channels = 1 if first.mode in ("1", "L", "I", "I;16", "F") else 3
        return {"classes": classes, "image_size": [first.height, first.width], "channels": channels}


class Images(OwnDataTask):
    name = "images"
    data_kind = "FOLDER"
    models = ("cnn",)
    input_description = "N x C x H x W float32: the image resized to the job's H x W, pixels / 255"
    defaults: ClassVar[dict[str, Any]] = {"local_epochs": 3, "batch_size": 16, "lr": 0.1, "weight_decay": 0.0}

    def __init__(self, model: str | None = None) -> None:
        super().__init__(model)
        self.classes: list[str] = []
        self.image_size: tuple[int, int] = (0, 0)
        self.channels = 0
        self.data: Path | None = None

    def configure(self, job: Mapping[str, Any]) -> None:
        if "data" in job:
            self.data = Path(str(job["data"]))
        schema = infer_schema(self.data) if self.data is not None else {}
        classes = json.loads(job["classes"]) if "classes" in job else schema.get("classes")
        size = json.loads(job["image_size"]) if "image_size" in job else schema.get("image_size")
        channels = int(job["channels"]) if "channels" in job else schema.get("channels", 3)
        if not classes or not size:
            raise ValueError(
                "task images needs its schema: [task] classes and image_size (or data, to infer them)"
            )
        if len(size) != 2 or min(size) < 4 or channels not in (1, 3):
            raise ValueError(
                f"task images: image_size must be [H, W] >= 4 and channels 1 or 3, not {size}, {channels}"
            )
        self.classes, self.image_size, self.channels = list(classes), (int(size[0]), int(size[1])), channels
        self.__dict__.pop("_split", None)  # a new schema: a new split

    def build_model(self) -> nn.Module:
        h, w = self.image_size
        if not self.classes:
            raise ValueError("task images is not configured: [task] classes and image_size")
        return nn.Sequential(
            nn.Conv2d(self.channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (h // 4) * (w // 4), len(self.classes)),
        )

    def load_file(self, path: Path) -> Dataset:
        """Every image of the folder's class sub-folders, as the job's schema says."""
        return self._images(path)

    @property
    def _mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def _images(self, folder: Path) -> Dataset:
        from PIL import Image, UnidentifiedImageError

        if not folder.is_dir():
            raise ValueError(f"data {folder} is not a folder of class sub-folders")
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if unknown := [c for c in found if c not in self.classes]:
            raise ValueError(f"{folder}: classes {unknown} are not the job's {self.classes}")
        h, w = self.image_size
        xs: list[np.ndarray] = []
        ys: list[int] = []
        for label, name in enumerate(self.classes):
            directory = folder / name
            if not directory.is_dir():
                continue  # a site need not hold every class
            for path in sorted(directory.iterdir()):
                if path.suffix.lower() not in EXTENSIONS:
                    continue
                try:
                    with Image.open(path) as image:
                        pixels = (
                            np.asarray(image.convert(self._mode).resize((w, h)), dtype=np.float32) / 255.0
                        )
                except (UnidentifiedImageError, OSError) as err:
                    raise ValueError(f"{path}: not a readable image ({err})") from None
                xs.append(pixels[None] if self.channels == 1 else pixels.transpose(2, 0, 1))
                ys.append(label)
        if not ys:
            raise ValueError(f"{folder}: no .png/.jpg images in the job's class sub-folders {self.classes}")
        return Dataset(np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64))
