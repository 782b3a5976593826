"""Data sources: image folders, embedding files, the demo, and their clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from ssl_pipeline.data.sources import build_table, load_embeddings_file
from ssl_pipeline.data.table import labeled_per_class_mask
from ssl_pipeline.errors import ConfigError, DataError
from tests.conftest import make_image_folder


def folder_cfg(base, **kw):
    return OmegaConf.create({"kind": "image_folder", "root": str(base / "train"), "test_root": str(base / "test"),
                             "unlabeled_root": None, "test_fraction": 0.0, "labeled_per_class": 2, "seed": 0, **kw})


def test_image_folder_table(tmp_path):
    root = make_image_folder(tmp_path, n_train=5, n_test=2)
    t = build_table(folder_cfg(root))
    assert len(t) == 3 * 7 and t.classes == ["blue", "green", "red"]
    assert t.labeled.sum() == 6 and not (t.labeled & t.test).any()
    assert (t.y_true >= 0).all()


def test_unlabeled_root_rows_have_no_truth(tmp_path):
    root = make_image_folder(tmp_path, n_train=4, n_test=1)
    extra = tmp_path / "extra"
    extra.mkdir()
    (root / "train" / "red" / "000.png").rename(extra / "x.png")
    t = build_table(folder_cfg(root, unlabeled_root=str(extra)))
    row = t.ids.index("unlabeled/x.png")
    assert t.y_true[row] == -1 and t.train[row] and not t.labeled[row]


def test_labeled_mask_follows_the_benchmark_protocol():
    y = np.repeat(np.arange(3), 10)
    m = labeled_per_class_mask(y, np.ones(30, bool), 2, seed=5)
    rng = np.random.default_rng(5)
    expect = np.concatenate([rng.choice(np.flatnonzero(y == c), 2, replace=False) for c in range(3)])
    assert sorted(np.flatnonzero(m)) == sorted(expect)


@pytest.mark.parametrize("bad,key", [({"labeled_per_class": 100000}, "data.labeled_per_class"),
                                     ({"labeled_per_class": 0}, "data.labeled_per_class"),
                                     ({"root": "/no/such/dir"}, "data.root"),
                                     ({"test_root": "/no/such/dir"}, "data.test_root")])
def test_bad_folder_config_names_the_key(tmp_path, bad, key):
    root = make_image_folder(tmp_path, n_train=3, n_test=1)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_table(folder_cfg(root, **bad))


def test_empty_folder_and_unknown_test_class(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no image files"):
        build_table(folder_cfg(tmp_path, root=str(tmp_path / "empty"), test_root=None))
    root = make_image_folder(tmp_path / "x", n_train=3, n_test=1)
    (root / "test" / "purple").mkdir()
    with pytest.raises(ConfigError, match="purple"):
        build_table(folder_cfg(root))


def save(tmp_path, **arrays):
    p = tmp_path / "e.npz"
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("arrays,msg", [
    ({"X": np.ones((4, 3)), "y": np.array([0, 1, -1])}, "shape"),
    ({"X": np.array([[np.nan, 1.0], [1.0, 0.0]]), "y": np.array([0, 1])}, "NaN"),
    ({"X": np.ones(4), "y": np.zeros(4, int)}, "N x D"),
    ({"X": np.ones((3, 2)), "y": np.array([0, -2, 1])}, "below -1"),
    ({"X": np.ones((3, 2)), "y": np.array([-1, -1, -1])}, "no labeled"),
    ({"X": np.ones((3, 2)), "y": np.array([0, 5, -1]), "classes": np.array(["a", "b"])}, "classes has only"),
    ({"X": np.ones((3, 2))}, "missing array 'y'"),
    ({"X": np.zeros((3, 2)), "y": np.array([0, 1, -1])}, "all-zero"),
    ({"X": np.ones((3, 2)), "y": np.array([0, 1, -1]), "split": np.array(["train", "val", "test"])}, "split"),
])
def test_bad_embedding_files_get_clear_errors(tmp_path, arrays, msg):
    with pytest.raises(DataError, match=msg):
        load_embeddings_file(save(tmp_path, **arrays))


def test_missing_embeddings_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        load_embeddings_file(tmp_path / "none.npz")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 30), d=st.integers(1, 8), seed=st.integers(0, 10_000),
       corrupt=st.sampled_from(["none", "nan", "label", "shape"]))
def test_embeddings_loader_accepts_valid_and_rejects_invalid(tmp_path, n, d, seed, corrupt):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) + 0.01
    y = rng.integers(-1, 3, n)
    y[0] = 0
    if corrupt == "nan":
        X[rng.integers(n), rng.integers(d)] = np.nan
    elif corrupt == "label":
        y[rng.integers(n)] = -5
    elif corrupt == "shape":
        y = np.concatenate([y, [0]])
    p = save(tmp_path, X=X, y=y)
    if corrupt == "none":
        a = load_embeddings_file(p)
        assert a["X"].shape == (n, d) and (a["y"] == y).all()
    else:
        with pytest.raises(DataError):
            load_embeddings_file(p)
