"""`digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from sklearn.datasets import load_digits
from torch import nn

from fedcore.privacy.book_keeping import Shift
from fedcore.tasks.base import Dataset
from fedcore.tasks.bundled import BundledTask


class Digits(BundledTask):
    name = "digits"
    models = ("cnn", "linear")
    # Under sample-level DP: a linear model on centred pixels (few parameters, so little noise
    # per parameter), full-batch steps at a large learning rate (`[privacy] sample_rate` 1 and
    # `local_steps` 1, the defaults), and the average of the global models: measured in
    # simulations/dp_utility.py.
    private_defaults: ClassVar[dict[str, Any]] = {"model": "linear", "lr": 4.0, "average": 0.9}
    input_description = "N x 1 x 8 x 8 float32: the 8x8 digit image, pixels / 16 (0..1)"
    defaults: ClassVar[dict[str, Any]] = {"local_epochs": 3, "batch_size": 16, "lr": 0.1, "weight_decay": 0.0}

    def load_bundled(self) -> Dataset:
        bunch = load_digits()
        images = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]  # N x 1 x 8 x 8
        return Dataset(images, bunch.target.astype(np.int64))

    def build_model(self) -> nn.Module:
        if self.model == "linear":  # multinomial logistic regression on pixels centred at 0
            return nn.Sequential(Shift(-0.5), nn.Flatten(), nn.Linear(64, 10))
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 x 4 x 4
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 32 x 2 x 2
            nn.Flatten(),
            nn.Linear(128, 10),
        )
