"""Data loading: the bundled digits, stratified reproducible splits, image folders and CSVs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training import data
from training.errors import DataError


def test_digits_are_real_8x8_images_with_ten_classes():
    ds = data.load_digits()
    assert ds.x.shape == (1797, 1, 8, 8)
    assert ds.x.dtype == np.float32
    assert ds.x.min() == 0
    assert ds.x.max() == 16
    assert ds.label_names == tuple(str(i) for i in range(10))


def test_split_is_stratified_disjoint_and_reproducible():
    y = data.load_digits().y
    train_a, val_a = data.stratified_split(y, 0.2, seed=3)
    train_b, val_b = data.stratified_split(y, 0.2, seed=3)
    _, val_c = data.stratified_split(y, 0.2, seed=4)
    assert np.array_equal(val_a, val_b)
    assert np.array_equal(train_a, train_b)
    assert not np.array_equal(val_a, val_c)
    assert set(train_a).isdisjoint(val_a)
    assert len(train_a) + len(val_a) == len(y)
    for label in range(10):
        share = np.sum(y[val_a] == label) / np.sum(y == label)
        assert abs(share - 0.2) < 0.01


def test_normalisation_comes_from_the_training_split_only():
    ds = data.load_digits()
    split = data.make_split(ds, 0.2, seed=0)
    train_idx, _ = data.stratified_split(ds.y, 0.2, seed=0)
    assert split.info.normalization.mean[0] == pytest.approx(float(ds.x[train_idx].mean()))
    assert split.train_x.mean() == pytest.approx(0.0, abs=1e-5)
    assert split.train_x.std() == pytest.approx(1.0, abs=1e-4)
    assert split.info.input_shape == (1, 8, 8)
    assert split.info.value_range == (0.0, 16.0)
    assert split.info.ink == "high"


def test_data_info_round_trips_through_a_dict():
    info = data.make_split(data.load_digits(), 0.2, 0).info
    assert data.DataInfo.from_dict(info.to_dict()) == info


def make_image_folder(root, sizes=(12, 20), per_class=3):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (sizes[i % 2], sizes[i % 2], 3), dtype=np.uint8)
            pixels[..., 0] = 200 * c  # red channel tells the classes apart
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_image_folder_reads_resizes_and_labels(tmp_path):
    make_image_folder(tmp_path)
    ds = data.load_image_folder(tmp_path, image_size=16, color_mode="RGB")
    assert ds.x.shape == (6, 3, 16, 16)
    assert ds.label_names == ("cat", "dog")
    assert list(ds.y) == [0, 0, 0, 1, 1, 1]
    assert ds.x[:3, 0].max() == 0
    assert ds.x[3:, 0].min() == 200
    grey = data.load_image_folder(tmp_path, image_size=8, color_mode="L")
    assert grey.x.shape == (6, 1, 8, 8)


def test_image_folder_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_image_folder(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    with pytest.raises(DataError, match="two class subfolders"):
        data.load_image_folder(tmp_path)
    make_image_folder(tmp_path / "set")
    (tmp_path / "set" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot read image"):
        data.load_image_folder(tmp_path / "set")


def test_csv_reads_features_and_string_labels(tmp_path):
    path = tmp_path / "iris.csv"
    path.write_text("a,label,b\n1.5,setosa,2\n3,virginica,4.25\n-1,setosa,0\n")
    ds = data.load_csv(path)
    assert ds.x.tolist() == [[1.5, 2.0], [3.0, 4.25], [-1.0, 0.0]]
    assert ds.label_names == ("setosa", "virginica")
    assert ds.y.tolist() == [0, 1, 0]
    assert ds.meta["feature_names"] == ("a", "b")


def test_csv_numeric_labels_sort_by_value(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("x,label\n" + "".join(f"{i},{lab}\n" for i, lab in enumerate(["2", "10", "1"])))
    assert data.load_csv(path).label_names == ("1", "2", "10")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("x,y\n1,2\n", "no column 'label'"),
        ("x,label\n1,a\nfoo,b\n", "line 3 has a non-numeric feature"),
        ("x,label\n1,a\n2\n", "line 3 has 1 fields"),
        ("x,label\nnan,a\n", "finite"),
        ("x,label\n", "at least one data row"),
    ],
)
def test_csv_errors_name_the_problem(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(DataError, match=message):
        data.load_csv(path)


def test_load_source_dispatches(tmp_path):
    assert data.load_source("digits").meta["source"] == "digits"
    with pytest.raises(DataError, match="neither 'digits'"):
        data.load_source(str(tmp_path / "nothing"))
