"""Build script: everything declarative lives in setup.cfg.

The one thing setup.cfg cannot say is "install this .pth file at the top of site-packages", which is how the
transformers plugin registers itself in a fresh interpreter (see hf_autoround_autoload.py). build_py copies it into
the build tree so that both regular and editable wheels carry it.
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "hf_autoround-autoload.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        target = os.path.join(self.build_lib, PTH_NAME)
        shutil.copyfile(os.path.join(here, PTH_NAME), target)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


setup(cmdclass={"build_py": BuildPyWithPth})
