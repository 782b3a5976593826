"""Build hook: ship the repository's ``conf/`` (the Hydra configs, kept at the root as their source) inside the
wheel as ``ssl_pipeline/conf``, so that an installed package finds its configs from any folder."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads conf/ from the checkout
            return
        src = Path(__file__).resolve().parent / "conf"
        dst = Path(self.build_lib) / "ssl_pipeline" / "conf"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConf})
