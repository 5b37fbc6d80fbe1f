"""Build script: everything declarative lives in setup.cfg.

What setup.cfg cannot say: "install this .pth file at the top of site-packages" (how the transformers plugin
registers itself in a fresh interpreter, see hf_autoround_autoload.py) and "ship kernels/*.c and *.h inside the
package" (sources of the native kernels, compiled on first use). build_py copies both into the build tree of a wheel.
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "hf_autoround-autoload.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        for source, target in self._extra_files():
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(source, target)

    def _extra_files(self):
        """The autoload .pth at the top of site-packages, and the native kernel sources inside the package."""
        here = os.path.dirname(os.path.abspath(__file__))
        files = [(os.path.join(here, PTH_NAME), os.path.join(self.build_lib, PTH_NAME))]
        kernels = os.path.join(here, "kernels")
        for name in sorted(os.listdir(kernels)):
            if name.endswith((".c", ".h")):
                files.append((os.path.join(kernels, name),
                              os.path.join(self.build_lib, "hf_autoround", "backends", "csrc", name)))
        return files

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [target for _, target in self._extra_files()]


setup(cmdclass={"build_py": BuildPyWithPth})
