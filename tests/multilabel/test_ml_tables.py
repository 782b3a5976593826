"""Multi-label tables: the CSV manifest (MIML format), the mosaic demo, and every bad-manifest error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ssl_pipeline.data.multilabel import draw_labeled_fraction, multilabel_csv_table, multilabel_demo_table
from ssl_pipeline.errors import ConfigError, DataError

LABELS = ["desert", "sea", "trees"]


def write_folder(root: Path, rows: list[list], header: list[str] | None = None, images: bool = True) -> Path:
    """Images root/<name> (tiny PNGs) and root/labels.csv with ``header`` then ``rows``."""
    root.mkdir(parents=True, exist_ok=True)
    header = header or ["Filenames", *LABELS]
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    if images:
        for r in rows:
            Image.new("RGB", (8, 8), (int(hash(r[0]) % 255), 0, 0)).save(root / str(r[0]))
    return root / "labels.csv"


def cfg_for(folder, manifest, **kw):
    c = {"kind": "multilabel_csv", "root": str(folder), "manifest": str(manifest), "labeled_fraction": 0.25,
         "test_fraction": 0.2, "image_size": 224, "seed": 0}
    c.update(kw)
    return OmegaConf.create(c)


def good_rows(n: int = 20) -> list[list]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        y = (rng.random(3) < 0.4).astype(int)
        y[i % 3] = 1  # every label has positives
        rows.append([f"{i}.png", *y])
    return rows


def test_manifest_table(tmp_path):
    m = write_folder(tmp_path, good_rows())
    t = multilabel_csv_table(cfg_for(tmp_path, m))
    assert t.multilabel and t.classes == LABELS and len(t) == 20
    assert t.y_true.shape == (20, 3) and t.y_true.dtype == np.int8
    assert set(np.unique(t.split)) == {"train", "test"} and t.test.sum() == 4
    assert t.labeled.dtype == bool and not (t.labeled & t.test).any()
    assert (t.y_true[t.labeled].sum(0) >= 1).all()  # every label has a labeled positive
    assert t.paths[0] == str(tmp_path / "0.png") and t.ids[0] == "0.png"


def test_split_column_fixes_the_test_split(tmp_path):
    rows = [[*r, "test" if i < 5 else "train"] for i, r in enumerate(good_rows())]
    m = write_folder(tmp_path, rows, ["Filenames", *LABELS, "split"])
    t = multilabel_csv_table(cfg_for(tmp_path, m))
    assert t.classes == LABELS  # split is not a label
    assert list(t.split[:5]) == ["test"] * 5 and (t.split[5:] == "train").all()


def test_seed_moves_the_labeled_draw(tmp_path):
    m = write_folder(tmp_path, good_rows(40))
    a = multilabel_csv_table(cfg_for(tmp_path, m, seed=0))
    b = multilabel_csv_table(cfg_for(tmp_path, m, seed=0))
    c = multilabel_csv_table(cfg_for(tmp_path, m, seed=1))
    assert (a.labeled == b.labeled).all() and (a.split == b.split).all()
    assert (a.labeled != c.labeled).any()


def test_missing_images_are_skipped_and_counted(tmp_path, caplog):
    m = write_folder(tmp_path, good_rows())
    (tmp_path / "3.png").unlink()
    (tmp_path / "7.png").unlink()
    t = multilabel_csv_table(cfg_for(tmp_path, m))
    assert len(t) == 18 and t.meta["n_missing"] == 2 and "3.png" not in t.ids
    assert "missing" in caplog.text


@pytest.mark.parametrize("case, rows, header, match", [
    ("bad value", [["0.png", 1, 0, 2]], None, r"line 2, column 'trees': value '2' is not 0 or 1"),
    ("bad split", [["0.png", 1, 0, 1, "val"]], ["Filenames", *LABELS, "split"], r"column 'split': value 'val'"),
    ("listed twice", [["0.png", 1, 0, 1], ["1.png", 0, 1, 0], ["0.png", 1, 1, 1]], None,
     r"line 4: image '0.png' is listed twice \(first on line 2\)"),
    ("no positive", [["0.png", 1, 0, 0], ["1.png", 1, 1, 0]], None, r"label column 'trees' has no positive"),
    ("short row", [["0.png", 1, 0]], None, r"line 2: 3 fields, the header has 4"),
    ("no labels", [["0.png"]], ["Filenames"], r"expected the file name column and at least one"),
    ("empty name", [["", 1, 0, 1]], None, r"line 2: empty file name"),
    ("duplicate label", [["0.png", 1, 0, 1]], ["Filenames", "a", "a", "b"], r"'a' appears more than once"),
])
def test_bad_manifests_name_the_problem(tmp_path, case, rows, header, match):
    m = write_folder(tmp_path, rows, header, images=False)
    for r in rows:
        if r[0]:
            Image.new("RGB", (8, 8)).save(tmp_path / r[0])
    with pytest.raises(DataError, match=match) as e:
        multilabel_csv_table(cfg_for(tmp_path, m))
    assert "labels.csv" in str(e.value)


def test_empty_manifest(tmp_path):
    (tmp_path / "labels.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        multilabel_csv_table(cfg_for(tmp_path, tmp_path / "labels.csv"))


def test_missing_config_and_files(tmp_path):
    m = write_folder(tmp_path / "ok", good_rows())
    with pytest.raises(ConfigError, match="data.root"):
        multilabel_csv_table(cfg_for(tmp_path / "ok", m, root="???"))
    with pytest.raises(ConfigError, match="data.root.*does not exist"):
        multilabel_csv_table(cfg_for(tmp_path / "nope", m))
    with pytest.raises(ConfigError, match="data.manifest.*does not exist"):
        multilabel_csv_table(cfg_for(tmp_path / "ok", tmp_path / "none.csv"))
    with pytest.raises(ConfigError, match="data.labeled_fraction"):
        multilabel_csv_table(cfg_for(tmp_path / "ok", m, labeled_fraction=1.5))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="none of the 20 images"):
        multilabel_csv_table(cfg_for(empty, m))


def test_draw_labeled_fraction_tops_up_rare_labels():
    Y = np.zeros((100, 2), np.int8)
    Y[:, 0] = 1
    Y[7, 1] = 1  # one positive of the rare label
    mask = draw_labeled_fraction(Y, np.ones(100, bool), 0.05, seed=0)
    assert mask[7] and 5 <= mask.sum() <= 6


def test_demo_mosaics():
    cfg = OmegaConf.create({"kind": "multilabel_demo", "source": "mnist_mosaic", "n_images": 60,
                            "labeled_fraction": 0.2, "test_fraction": 0.2, "seed": 0})
    t = multilabel_demo_table(cfg)
    assert t.multilabel and len(t) == 60 and t.y_true.shape == (60, 10) and len(t.classes) == 10
    assert (t.y_true.sum(1) >= 1).all() and (t.y_true.sum(1) <= 4).all()
    img = t.load_image(0)
    assert img.size == (56, 56)
    assert t.test.sum() == 12 and not (t.labeled & t.test).any()
    t2 = multilabel_demo_table(OmegaConf.merge(cfg, {"seed": 1}))
    assert (t2.y_true == t.y_true).all() and (t2.split == t.split).all()  # same mosaics, other labeled draw
