"""Packaging beyond what pyproject.toml can say: conf/ (with the recipes its conf/recipe
link points to) ships inside the package as vlmtrain/conf, so an installed wheel
composes configs and runs recipes from any directory. Everything else is in
pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's conf/ (vlmtrain.cli.conf_dir)
        target = Path(self.build_lib) / "vlmtrain" / "conf"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(Path(__file__).parent / "conf", target)  # follows conf/recipe


setup(cmdclass={"build_py": BuildPyWithConf})
