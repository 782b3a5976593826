"""Encode with Lightning Trainer.predict: two CPU processes (DDP, gloo) write the same shards as one."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ssl_pipeline import pipeline
from ssl_pipeline.stages import predict_writer
from tests.conftest import ROOT, make_config, tiny_overrides

pytestmark = pytest.mark.slow  # several processes / the 5,000-image demo: run with -m slow


def shard_files(d):
    return sorted(p.name for p in d.iterdir() if p.suffix in (".npy", ".json"))


def test_two_processes_give_the_same_embeddings_as_one(tmp_path, image_root):
    ov = tiny_overrides(image_root, **{"encode.shard_size": 8, "encode.batch_size": 3})
    # one process, the encode stage's own loop
    pipeline.run(make_config(*ov, "stage=encode", cache_dir=tmp_path / "cache"), tmp_path / "loop")
    loop = next(p for p in (tmp_path / "cache" / "encode").iterdir() if (p / "_COMPLETE").exists()) / "shards"
    # one process through Trainer.predict
    predict_writer.main(["--out", str(tmp_path / "one"), *ov])
    # two processes: strategy=ddp re-launches this command for rank 1; each rank writes its own shards
    p = subprocess.run([sys.executable, "-m", "ssl_pipeline.stages.predict_writer", "--out", str(tmp_path / "two"),
                        *ov, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "encoded 42 images" in p.stdout, p.stdout[-2000:]
    one, two = tmp_path / "one" / "shards", tmp_path / "two" / "shards"
    assert shard_files(loop) == shard_files(one) == shard_files(two)
    assert len(shard_files(two)) == 3 * 6  # 42 rows / 8 per shard = 6 shards: emb_, rows_, skip_
    for name in shard_files(loop):
        if name.endswith(".npy"):
            a, b, c = (np.load(d / name) for d in (loop, one, two))
            np.testing.assert_array_equal(a, b, err_msg=name)
            np.testing.assert_array_equal(a, c, err_msg=name)
        else:
            assert (loop / name).read_text() == (two / name).read_text()
