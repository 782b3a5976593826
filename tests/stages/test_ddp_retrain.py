"""retrain=finetune with trainer.strategy=ddp on 2 CPU processes (gloo) through the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ssl_pipeline import pipeline
from tests.conftest import ROOT, make_config, tiny_overrides

pytestmark = pytest.mark.slow  # several processes / the 5,000-image demo: run with -m slow

FT = ["retrain=finetune", "retrain.steps=8", "retrain.batch_size=16", "retrain.checkpoint_every=4",
      "retrain.eval_batch_size=64"]


def test_ddp_two_cpu_processes_match_one_process(tmp_path, image_root):
    ov = tiny_overrides(image_root) + FT
    p = subprocess.run([sys.executable, "-m", "ssl_pipeline", *ov, "trainer=ddp", "trainer.accelerator=cpu",
                        "trainer.devices=2", f"hydra.run.dir={tmp_path / 'ddp'}", f"paths.cache_dir={tmp_path / 'c'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    # every rank's errors (rank 1's traceback comes before rank 0's in the interleaved stream)
    errors = "\n".join(line for line in p.stderr.splitlines() if "Error" in line or "rank" in line.lower())
    assert p.returncode == 0, p.stdout[-2000:] + errors[-4000:] + p.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["retrain/world_size"] == 2
    assert "retrain/test_accuracy" in m and "retrain/labeled_only_test_accuracy" in m
    # one process on the same global batches and augmentations: the same model up to float rounding (the
    # all-reduced gradients differ in the last bits, which Adam's normalised steps turn into ~1e-4 changes;
    # a different data order or loss normalisation moves weights by ~lr * steps = 1e-2)
    one = pipeline.run(make_config(*ov, cache_dir=tmp_path / "c"), tmp_path / "one")
    assert one["retrain/world_size"] == 1
    a = torch.load(tmp_path / "ddp" / "retrain" / "round1" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "retrain" / "round1" / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3, msg=k)
