"""`bench:PARAMS`: a model of PARAMS float32 values whose local training is a fixed cheap
update (+0.01 everywhere), to measure what the framework itself costs per round."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedcore.tasks.base import Dataset, Evaluation, FitOutcome, SiteData, Task, TrainSettings
from fedcore.tensors import Arrays

STEP = np.float32(0.01)


class Bench(Task):
    name = "bench"
    models = ("vector",)
    defaults: ClassVar[dict[str, Any]] = {"local_epochs": 1, "batch_size": 1, "lr": 1.0, "weight_decay": 0.0}

    def __init__(self, params: int = 100_000) -> None:
        super().__init__(None)
        self.params = params

    def initial_parameters(self, seed: int) -> Arrays:
        return {"w": np.zeros(self.params, dtype=np.float32)}

    def site_data(self, uri: str, *, partition: str, seed: int, partitions: int) -> SiteData:
        return SiteData(train=Dataset(np.zeros((1, 1), np.float32), np.zeros(1, np.int64)))

    def test_data(self, *, seed: int, partitions: int) -> Dataset | None:
        # A one-example held-out split: evaluation is central and costs nothing, so a round
        # measures dispatch, transport and aggregation alone.
        return Dataset(np.zeros((1, 1), np.float32), np.zeros(1, np.int64))

    def fit(self, parameters: Arrays, data: SiteData, settings: TrainSettings) -> FitOutcome:
        return FitOutcome(parameters={"w": parameters["w"] + STEP}, num_examples=1)

    def evaluate(self, parameters: Arrays, data: Dataset) -> Evaluation:
        return Evaluation(loss=float(np.mean(parameters["w"])), accuracy=0.0, num_examples=len(data))
