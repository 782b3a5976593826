"""``trainer=ddp trainer.devices=2`` reaches the pipeline's encode stage and the default head retrain (gloo on CPU),
and both give what one process gives."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ssl_pipeline.stages.encode import EmbeddingStore
from tests.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow  # two processes per run

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def cli(tmp_path, name: str, *ov: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "ssl_pipeline", *ov, f"hydra.run.dir={tmp_path / name}",
                        f"paths.cache_dir={tmp_path / (name + '_cache')}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert not any(s in out for s in ("💡", "litlogger", "GPU available", "TPU available")), out[-2000:]
    return json.loads((tmp_path / name / "metrics.json").read_text())


def test_pipeline_encode_on_two_processes_matches_one(tmp_path, image_root):
    ov = tiny_overrides(image_root, stage="encode", **{"encode.shard_size": 8, "encode.batch_size": 3})
    one = cli(tmp_path, "one", *ov)
    two = cli(tmp_path, "two", *ov, *DDP)
    assert one["encode/world_size"] == 1 and two["encode/world_size"] == 2
    a, b = (EmbeddingStore(next((tmp_path / f"{n}_cache" / "encode").glob("*[!l]"))) for n in ("one", "two"))
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.load(), b.load())


def test_head_retrain_on_two_processes_matches_one(tmp_path, embeddings_file):
    ov = ["data=embeddings", f"data.path={embeddings_file}", "retrain.steps=60", "retrain.batch_size=64"]
    one = cli(tmp_path, "one", *ov)
    two = cli(tmp_path, "two", *ov, *DDP)
    assert one["retrain/world_size"] == 1 and two["retrain/world_size"] == 2
    for k in ("retrain/test_accuracy", "retrain/labeled_only_test_accuracy"):
        assert abs(one[k] - two[k]) <= 0.02, (k, one[k], two[k])
    # the same global batches and weighted means: the same heads up to the all-reduce's float rounding
    a, b = (torch.load(next((tmp_path / f"{n}_cache" / "retrain").glob("*[!l]")) / "head.pt", weights_only=True)
            for n in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3, msg=k)
