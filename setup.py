"""Build hook: ship the top-level ``rules/`` and ``schemas/`` folders inside the wheel.

They live at the top of the repository (where people look for them) and are copied to
``mapper/_data/`` at build time, so a non-editable ``pip install .`` finds them as package
data. An editable install or a checkout reads them in place (see ``mapper/resources.py``).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        root = Path(__file__).parent
        target = Path(self.build_lib) / "mapper" / "_data"
        for name in ("rules", "schemas"):
            shutil.copytree(root / name, target / name, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithData})
