"""`images`: a folder of PNGs, one sub-folder per class, read with Pillow; the schema
inferred by `simulate` or given by the job; one clear line for data that does not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from fedcore import load_experiment, run_simulation
from fedcore.tasks import build_task, task_for


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits written as 8x8 grey PNGs, one sub-folder per class."""
    folder = tmp_path_factory.mktemp("digits-png")
    bunch = load_digits()
    for k, (image, label) in enumerate(zip(bunch.images, bunch.target, strict=True)):
        (folder / f"digit-{label}").mkdir(exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L").save(
            folder / f"digit-{label}" / f"{k}.png"
        )
    return folder


def test_a_png_folder_trains_to_90_percent_in_simulate(digits_folder: Path, tmp_path: Path) -> None:
    e = load_experiment().override(
        task__name="images", task__data=str(digits_folder), federation__rounds=15, simulation__sites=5,
        simulation__workers=1, data__partition="iid",
    )  # fmt: skip
    task = task_for(e)
    assert (
        task.classes == [f"digit-{d}" for d in range(10)] and task.image_size == (8, 8) and task.channels == 1
    )  # type: ignore[attr-defined]
    result, _ = run_simulation(e, tmp_path)
    assert result.records[-1].accuracy is not None and result.records[-1].accuracy >= 0.90


def test_a_site_folder_must_fit_the_jobs_schema(digits_folder: Path, tmp_path: Path) -> None:
    task = build_task("images")
    task.configure({"classes": '["digit-0", "digit-1"]', "image_size": "[8, 8]", "channels": 1})
    with pytest.raises(ValueError, match=r"classes \['digit-2'.*are not the job's"):
        task.site_data(str(digits_folder), partition="iid", seed=0, partitions=1)
    site = tmp_path / "site"
    for name in ("digit-0", "digit-1"):
        (site / name).mkdir(parents=True)
        for k in range(5):
            Image.new("RGB", (16, 12), (k * 40, 0, 0)).save(site / name / f"{k}.jpg")
    data = task.site_data(str(site), partition="iid", seed=0, partitions=1)
    assert data.train.x.shape[1:] == (1, 8, 8) and data.test is not None  # resized, grey, 20% held out
    assert len(data.train) + len(data.test) == 10
    (site / "digit-1" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        task.site_data(str(site), partition="iid", seed=0, partitions=1)
    with pytest.raises(ValueError, match="needs its schema"):
        build_task("images").configure({})


def test_sites_train_their_own_folders_over_grpc_with_the_jobs_schema(
    digits_folder: Path, tmp_path: Path
) -> None:
    """The server knows only the schema ([task] classes, image_size, channels); each site
    reads its own folder and evaluates on its own held-out part."""
    import asyncio
    import shutil

    from fedcore.client.agent import AgentSettings, Outcome, SiteAgent
    from tests.integration.test_grpc_rounds import federation

    sites = []
    for k in range(2):  # every other image of each class to each site
        site = tmp_path / f"site-{k + 1}"
        for class_dir in sorted(digits_folder.iterdir()):
            (site / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[k::2]:
                shutil.copy(image, site / class_dir.name / image.name)
        sites.append(site)
    e = load_experiment().override(
        task__name="images", task__classes=[f"digit-{d}" for d in range(10)], task__image_size=[8, 8],
        task__channels=1, federation__rounds=8, federation__min_sites=2,
    )  # fmt: skip

    def agent(port: int, k: int) -> SiteAgent:
        settings = AgentSettings(
            f"127.0.0.1:{port}", "images", str(sites[k]), None, site_name=f"site-{k + 1}"
        )
        return SiteAgent(settings, build_task("images"))  # the schema comes with the job

    async def run_sites(port: int) -> list[object]:
        return list(await asyncio.gather(*(agent(port, k).run() for k in range(2))))

    result, outcomes = asyncio.run(federation(e, tmp_path, run_sites))
    assert outcomes == [Outcome.COMPLETED, Outcome.COMPLETED]
    last = result.records[-1]
    assert last.evaluation == "federated" and last.accuracy is not None and last.accuracy >= 0.85
