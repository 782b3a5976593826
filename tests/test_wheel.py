"""The built wheel carries the configs: installed outside the checkout, ``python -m ssl_pipeline`` and
``ssl-pipeline`` run from another folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # builds a wheel


def test_wheel_runs_outside_the_checkout(tmp_path, embeddings_file):
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("ssl_pipeline-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "ssl_pipeline/conf/config.yaml" in names and "ssl_pipeline/conf/loss/ce.yaml" in names
    # install it the way a package index would, without the checkout: unpacked into a fresh venv's site-packages,
    # the dependencies taken from this interpreter's site-packages; the console script written by hand
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    zipfile.ZipFile(wheel).extractall(site)
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = venv / "bin" / "python"
    script = venv / "bin" / "ssl-pipeline"
    script.write_text(f"#!{py}\nfrom ssl_pipeline.__main__ import main\nmain()\n")
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import ssl_pipeline; print(ssl_pipeline.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, env=env)
    assert str(site) in where.stdout, where.stdout + where.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    for name, cmd in (("module", [str(py), "-m", "ssl_pipeline"]), ("script", [str(script)])):
        r = subprocess.run([*cmd, "stage=pseudolabel", "data=embeddings", f"data.path={embeddings_file}",
                            f"hydra.run.dir={work / name}", f"paths.cache_dir={work / 'cache'}"], capture_output=True,
                           text=True, cwd=work, env=env, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "pseudolabel/accuracy" in json.loads((work / name / "metrics.json").read_text())
