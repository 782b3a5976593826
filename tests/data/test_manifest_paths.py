"""Manifest rows naming files outside ``data.root`` are refused with one line naming the row."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf
from PIL import Image

from ssl_pipeline.data.multilabel import multilabel_csv_table
from ssl_pipeline.errors import DataError


def _folder(tmp_path, extra: str):
    root = tmp_path / "root"
    root.mkdir()
    rows = []
    for i in range(12):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{i % 2},{(i + 1) % 2}")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    name = extra.format(outside=outside)
    if extra == "link.png":
        os.symlink(outside, root / "link.png")
    m = tmp_path / "labels.csv"
    m.write_text("\n".join(["file,a,b", *rows, f"{name},1,0"]) + "\n")
    return OmegaConf.create({"kind": "multilabel_csv", "root": str(root), "manifest": str(m), "labeled_fraction": 0.25,
                             "test_fraction": 0.2, "image_size": 224, "seed": 0}), name


@pytest.mark.parametrize("extra, why", [("../outside.png", "outside"), ("{outside}", "absolute"),
                                        ("link.png", "symlink")])
def test_paths_leading_out_of_the_root_are_refused(tmp_path, extra, why):
    cfg, name = _folder(tmp_path, extra)
    with pytest.raises(DataError, match="line 14") as e:
        multilabel_csv_table(cfg)
    assert name in str(e.value) and why in str(e.value) and "\n" not in str(e.value)
