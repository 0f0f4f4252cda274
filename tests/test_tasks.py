"""Built-in tasks: breast_cancer (logreg, mlp), digits (cnn), synthetic (logreg)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer

from fedcore.tasks import Dataset, SiteData, Task, TrainSettings, build_task, default_partition
from fedcore.tasks.base import parse_builtin_uri
from fedcore.tasks.bundled import BundledTask
from fedcore.tasks.synthetic import CLASSES, DIMENSION, Synthetic
from fedcore.tensors import Arrays, check_like

TASKS = [("breast_cancer", "logreg"), ("breast_cancer", "mlp"), ("digits", "cnn"), ("synthetic", "logreg")]
BUNDLED = [("breast_cancer", None), ("digits", None)]


@cache
def task(name: str, model: str | None = None) -> Task:
    return build_task(name, model)


def row_ids(whole: Dataset, part: Dataset) -> np.ndarray:
    """Index in `whole` of each example of `part` (the bundled data has no duplicate rows)."""
    index = {row.tobytes(): i for i, row in enumerate(whole.x.reshape(len(whole), -1))}
    assert len(index) == len(whole)
    ids = np.array([index[row.tobytes()] for row in part.x.reshape(len(part), -1)], dtype=np.int64)
    np.testing.assert_array_equal(whole.y[ids], part.y)
    return ids


def assert_arrays_equal(a: Arrays, b: Arrays) -> None:
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def moved(a: Arrays, b: Arrays) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


# --- registry ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "model"), TASKS)
def test_build_task(name: str, model: str) -> None:
    built = build_task(name, model)
    assert built.name == name and built.model == model
    assert model in built.models
    assert set(built.defaults) == {"local_epochs", "batch_size", "lr", "weight_decay"}


def test_default_models_and_partitions() -> None:
    assert build_task("breast_cancer").model == "logreg"
    assert build_task("digits").model == "cnn"
    assert build_task("synthetic").model == "logreg"
    assert default_partition(build_task("breast_cancer")) == "dirichlet:0.5"
    assert default_partition(build_task("synthetic")) == "natural"


def test_synthetic_alpha_beta() -> None:
    built = build_task("synthetic:0.5,2")
    assert isinstance(built, Synthetic)
    assert (built.alpha, built.beta) == (0.5, 2.0)
    assert (build_task("synthetic").alpha, build_task("synthetic").beta) == (1.0, 1.0)
    with pytest.raises(ValueError, match="synthetic:ALPHA,BETA"):
        build_task("synthetic:1")
    with pytest.raises(ValueError, match="synthetic:ALPHA,BETA"):
        build_task("synthetic:a,b")


def test_unknown_task_lists_the_installed_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown task 'mnist'; installed tasks: .*breast_cancer, digits, flower, .*synthetic",
    ):
        build_task("mnist")


@pytest.mark.parametrize(
    ("name", "models"),
    [("breast_cancer", "'logreg', 'mlp'"), ("digits", "'cnn', 'linear'"), ("synthetic", "'logreg'")],
)
def test_unknown_model_lists_the_task_models(name: str, models: str) -> None:
    with pytest.raises(ValueError, match=rf"task '{name}' has no model 'resnet'; choose one of \[{models}\]"):
        build_task(name, "resnet")


# --- initial parameters ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "model"), TASKS)
def test_initial_parameters_deterministic_per_seed(name: str, model: str) -> None:
    t = task(name, model)
    torch_state = torch.random.get_rng_state()
    a, b, c = t.initial_parameters(3), t.initial_parameters(3), t.initial_parameters(4)
    assert torch.equal(torch.random.get_rng_state(), torch_state), "torch's global generator untouched"
    assert_arrays_equal(a, b)
    check_like(c, a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    assert all(v.dtype == np.float32 for v in a.values())
    # A fresh instance gives the same model: nothing but the seed decides.
    assert_arrays_equal(build_task(name, model).initial_parameters(3), a)


# --- bundled data: sites and the server's test split -------------------------------------


@pytest.mark.parametrize(("name", "model"), BUNDLED)
@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5", "shards:2"])
@pytest.mark.parametrize("sites", [3, 5])
def test_builtin_sites_are_disjoint_and_cover_the_train_split(
    name: str, model: str | None, partition: str, sites: int
) -> None:
    t = task(name, model)
    assert isinstance(t, BundledTask)
    train, _ = t._split
    parts = [
        t.site_data(f"builtin:{k}/{sites}", partition=partition, seed=11, partitions=99)
        for k in range(1, 1 + sites)
    ]
    ids = [row_ids(train, p.train) for p in parts]
    assert all(len(i) >= 2 for i in ids)
    everything = np.concatenate(ids)
    assert len(everything) == len(train), "no example at two sites"
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(train)))
    # Every site computes the same split on its own: same seed, same parts.
    again = t.site_data(f"builtin:2/{sites}", partition=partition, seed=11, partitions=1)
    np.testing.assert_array_equal(again.train.x, parts[1].train.x)
    other = t.site_data(f"builtin:2/{sites}", partition=partition, seed=12, partitions=1)
    assert len(other.train) != len(parts[1].train) or not np.array_equal(other.train.x, parts[1].train.x)


def test_builtin_k_without_n_uses_partitions() -> None:
    t = task("breast_cancer")
    short = t.site_data("builtin:2", partition="iid", seed=1, partitions=4)
    full = t.site_data("builtin:2/4", partition="iid", seed=1, partitions=9)
    np.testing.assert_array_equal(short.train.x, full.train.x)


@pytest.mark.parametrize("uri", ["builtin:0/3", "builtin:4/3", "builtin:x/3", "builtin:1/y", "builtin:"])
def test_bad_builtin_uri(uri: str) -> None:
    with pytest.raises(ValueError, match="bad data URI"):
        parse_builtin_uri(uri, 3)
    with pytest.raises(ValueError, match="bad data URI"):
        task("breast_cancer").site_data(uri, partition="iid", seed=0, partitions=3)


@pytest.mark.parametrize(("name", "model"), BUNDLED)
def test_test_split_is_disjoint_fixed_and_stratified(name: str, model: str | None) -> None:
    t = task(name, model)
    assert isinstance(t, BundledTask)
    whole = t.load_bundled()
    train, _ = t._split
    test = t.test_data(seed=0, partitions=3)
    train_ids, test_ids = row_ids(whole, train), row_ids(whole, test)
    assert np.intersect1d(train_ids, test_ids).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, test_ids])), np.arange(len(whole)))
    assert abs(len(test) / len(whole) - 0.2) < 0.01
    for c in np.unique(whole.y):
        assert abs(np.mean(test.y == c) - np.mean(whole.y == c)) < 0.01
    # The split belongs to the task, not to the experiment.
    for seed, partitions in [(1, 3), (12345, 10), (0, 1)]:
        other = build_task(name, model).test_data(seed=seed, partitions=partitions)
        np.testing.assert_array_equal(other.x, test.x)
        np.testing.assert_array_equal(other.y, test.y)


def test_digits_shapes() -> None:
    test = task("digits").test_data(seed=0, partitions=1)
    assert test.x.shape[1:] == (1, 8, 8) and test.x.dtype == np.float32
    assert test.x.min() >= 0 and test.x.max() <= 1
    assert set(np.unique(test.y)) == set(range(10))


# --- breast_cancer CSV -------------------------------------------------------------------


def write_csv(path: Path, rows: np.ndarray, *, header: bool, columns: int | None = None) -> Path:
    bunch = load_breast_cancer()
    names = [*bunch.feature_names, "label"][: columns or rows.shape[1]]
    with path.open("w") as f:
        if header:
            f.write(",".join(names) + "\n")
        np.savetxt(f, rows, delimiter=",", fmt="%.17g")
    return path


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    bunch = load_breast_cancer()
    return np.column_stack([bunch.data, bunch.target])


@pytest.mark.parametrize("header", [True, False])
def test_csv_loads_like_the_bundled_data(tmp_path: Path, raw: np.ndarray, header: bool) -> None:
    t = task("breast_cancer")
    path = write_csv(tmp_path / "site.csv", raw[:100], header=header)
    data = t.site_data(str(path), partition="iid", seed=0, partitions=1)
    assert isinstance(data, SiteData) and data.test is None
    assert len(data.train) == 100
    assert data.train.x.dtype == np.float32 and data.train.y.dtype == np.int64
    bundled = t.load_bundled()  # scaled with the same reference statistics
    np.testing.assert_allclose(data.train.x, bundled.x[:100], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(data.train.y, bundled.y[:100])


def test_csv_single_row(tmp_path: Path, raw: np.ndarray) -> None:
    data = task("breast_cancer").load_file(write_csv(tmp_path / "one.csv", raw[:1], header=True))
    assert data.x.shape == (1, 30)


def test_csv_wrong_column_count(tmp_path: Path, raw: np.ndarray) -> None:
    path = write_csv(tmp_path / "short.csv", np.delete(raw[:10], 3, axis=1), header=True)
    with pytest.raises(ValueError, match=r"expected 31 columns .* got 30"):
        task("breast_cancer").load_file(path)
    path = write_csv(tmp_path / "long.csv", np.column_stack([raw[:10], raw[:10, :1]]), header=False)
    with pytest.raises(ValueError, match=r"expected 31 columns .* got 32"):
        task("breast_cancer").load_file(path)


@pytest.mark.parametrize("label", [2.0, -1.0, 0.5])
def test_csv_bad_labels(tmp_path: Path, raw: np.ndarray, label: float) -> None:
    rows = raw[:10].copy()
    rows[4, -1] = label
    with pytest.raises(ValueError, match=r"last column must be 0 .* or 1"):
        task("breast_cancer").load_file(write_csv(tmp_path / "bad.csv", rows, header=False))


def test_csv_non_numeric_label(tmp_path: Path, raw: np.ndarray) -> None:
    path = write_csv(tmp_path / "text.csv", raw[:3], header=True)
    path.write_text(path.read_text() + ",".join(["1"] * 30) + ",benign\n")
    with pytest.raises(ValueError):
        task("breast_cancer").load_file(path)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_csv_non_finite_features(tmp_path: Path, raw: np.ndarray, value: float) -> None:
    rows = raw[:10].copy()
    rows[2, 7] = value
    with pytest.raises(ValueError, match="finite"):
        task("breast_cancer").load_file(write_csv(tmp_path / "nan.csv", rows, header=True))


def test_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        task("breast_cancer").site_data(str(tmp_path / "none.csv"), partition="iid", seed=0, partitions=1)


def test_digits_reads_no_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reads only builtin"):
        task("digits").site_data(str(tmp_path / "x.csv"), partition="iid", seed=0, partitions=1)


# --- synthetic ---------------------------------------------------------------------------


def test_synthetic_devices_deterministic_from_the_seed() -> None:
    t = task("synthetic")
    assert isinstance(t, Synthetic)
    for k in range(3):
        (a_train, a_test), (b_train, b_test) = t.device_data(k, 7), build_task("synthetic").device_data(k, 7)
        np.testing.assert_array_equal(a_train.x, b_train.x)
        np.testing.assert_array_equal(a_test.y, b_test.y)
    assert not np.array_equal(t.device_data(0, 7)[0].x[:50], t.device_data(0, 8)[0].x[:50])
    assert not np.array_equal(t.device_data(0, 7)[0].x[:50], t.device_data(1, 7)[0].x[:50])
    other = Synthetic(alpha=0.0, beta=0.0)
    assert not np.array_equal(t.device_data(0, 7)[0].x[:50], other.device_data(0, 7)[0].x[:50])


def test_synthetic_devices_sizes_and_labels() -> None:
    t = task("synthetic")
    assert isinstance(t, Synthetic)
    sizes = []
    for k in range(40):
        train, test = t.device_data(k, 3)
        size = len(train) + len(test)
        sizes.append(size)
        assert size >= 50
        assert len(train) == int(0.8 * size)
        for part in (train, test):
            assert part.x.shape[1:] == (DIMENSION,) and part.x.dtype == np.float32
            assert part.y.dtype == np.int64
            assert part.y.min() >= 0 and part.y.max() < CLASSES
    assert len(set(sizes)) > 30, "log-normal sizes differ from device to device"


def test_synthetic_site_data_and_test_split() -> None:
    t = task("synthetic")
    assert isinstance(t, Synthetic)
    site = t.site_data("builtin:3/10", partition="natural", seed=5, partitions=10)
    train, test = t.device_data(2, 5)
    np.testing.assert_array_equal(site.train.x, train.x)
    assert site.test is not None
    np.testing.assert_array_equal(site.test.y, test.y)
    pooled = t.test_data(seed=5, partitions=3)
    assert len(pooled) == sum(len(t.device_data(k, 5)[1]) for k in range(3))
    np.testing.assert_array_equal(pooled.x[: len(t.device_data(0, 5)[1])], t.device_data(0, 5)[1].x)


def test_synthetic_refuses_other_partitions_and_files() -> None:
    t = task("synthetic")
    with pytest.raises(ValueError, match="natural"):
        t.site_data("builtin:1/3", partition="iid", seed=0, partitions=3)
    with pytest.raises(ValueError, match="generates its data"):
        t.site_data("/data/x.csv", partition="natural", seed=0, partitions=3)


# --- fit and evaluate --------------------------------------------------------------------


def settings(**kw: float) -> TrainSettings:
    base = {
        "local_epochs": 2,
        "batch_size": 16,
        "lr": 0.05,
        "seed": 1,
        "proximal_mu": 0.0,
        "weight_decay": 0.0,
    }
    return TrainSettings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "model"), TASKS)
def test_fit_is_deterministic_given_the_seed(name: str, model: str) -> None:
    t = task(name, model)
    partition = "natural" if name == "synthetic" else "iid"
    data = t.site_data("builtin:1/4", partition=partition, seed=0, partitions=4)
    start = t.initial_parameters(0)
    frozen = {k: v.copy() for k, v in start.items()}
    a = t.fit(start, data, settings(local_epochs=1, seed=5))
    b = t.fit(start, data, settings(local_epochs=1, seed=5))
    c = t.fit(start, data, settings(local_epochs=1, seed=6))
    assert_arrays_equal(start, frozen)  # the caller's parameters are not trained in place
    assert_arrays_equal(a.parameters, b.parameters)
    assert a.metrics == b.metrics
    assert any(not np.array_equal(a.parameters[k], c.parameters[k]) for k in start), "seed orders the data"
    check_like(a.parameters, start)
    assert a.num_examples == len(data.train)
    assert np.isfinite(a.metrics["train_loss"])
    assert moved(a.parameters, start) > 0


def test_proximal_term_keeps_the_model_near_the_global_one() -> None:
    t = task("breast_cancer", "logreg")
    data = t.site_data("builtin:1/3", partition="dirichlet:0.5", seed=0, partitions=3)
    start = t.initial_parameters(0)
    # lr x mu = 1: every step pulls the model all the way back to the global one before
    # the loss gradient moves it, so drift cannot accumulate across steps.
    free = moved(t.fit(start, data, settings(lr=0.01, proximal_mu=0.0, local_epochs=3)).parameters, start)
    held = moved(t.fit(start, data, settings(lr=0.01, proximal_mu=100.0, local_epochs=3)).parameters, start)
    mild = moved(t.fit(start, data, settings(lr=0.01, proximal_mu=1.0, local_epochs=3)).parameters, start)
    assert held < 0.1 * free
    assert held < mild < free


def test_training_learns_breast_cancer() -> None:
    t = task("breast_cancer", "logreg")
    test = t.test_data(seed=0, partitions=1)
    start = t.initial_parameters(0)
    before = t.evaluate(start, test)
    data = t.site_data("builtin:1/1", partition="iid", seed=0, partitions=1)
    after = t.evaluate(t.fit(start, data, settings(lr=0.1, local_epochs=5)).parameters, test)
    assert after.num_examples == len(test) == before.num_examples
    assert 0.0 <= before.accuracy <= 1.0
    assert after.accuracy > 0.9
    assert after.loss < before.loss


def test_evaluate_counts_correct_predictions() -> None:
    t = task("breast_cancer", "logreg")
    params = {k: np.zeros_like(v) for k, v in t.initial_parameters(0).items()}
    params["0.bias"] = np.array([0.0, 1.0], np.float32)  # always predicts class 1 (benign)
    test = t.test_data(seed=0, partitions=1)
    result = t.evaluate(params, test)
    assert result.accuracy == pytest.approx(float(np.mean(test.y == 1)))
    expected_loss = -np.log(np.exp(np.where(test.y == 1, 1.0, 0.0)) / (1 + np.e))
    assert result.loss == pytest.approx(float(expected_loss.mean()), rel=1e-5)


def test_sample_level_dp_gets_the_tasks_private_defaults_for_what_the_job_leaves_unset() -> None:
    from fedcore import load_experiment
    from fedcore.tasks import job_settings, with_task_defaults

    plain = load_experiment().override(task__name="digits")
    assert with_task_defaults(plain) == plain
    private = with_task_defaults(plain.override(privacy__mode="sample", privacy__target_epsilon=3.0))
    assert (private.task.model, private.task.lr, private.strategy.average) == ("linear", 4.0, 0.9)
    chosen = plain.override(
        privacy__mode="sample", privacy__target_epsilon=3.0, task__model="cnn", task__lr=0.3
    )
    kept = with_task_defaults(chosen)
    assert (kept.task.model, kept.task.lr, kept.strategy.average) == ("cnn", 0.3, 0.9)
    assert job_settings(private, sites=True)["model"] == "linear"  # a site builds the job's model


def test_a_site_builds_the_model_the_job_names_and_refuses_an_unknown_one() -> None:

    from fedcore.tasks import build_task

    task = build_task("digits")
    task.use_model("linear")
    assert sum(p.size for p in task.initial_parameters(0).values()) == 64 * 10 + 10
    with pytest.raises(ValueError, match="no model"):
        task.use_model("transformer")
