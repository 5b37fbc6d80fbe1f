"""Registers hf_autoround with transformers as soon as transformers' quantizer registry is imported.

Imported from a ``.pth`` file at interpreter start, so it must stay cheap: stdlib only, no transformers or torch
import here. It installs a meta-path finder that waits for ``transformers.quantizers.auto`` to finish executing and
then calls :func:`hf_autoround.registration.register`. Set ``HF_AUTOROUND_AUTOLOAD=0`` to switch it off.
"""
import os
import sys

_TARGET = "transformers.quantizers.auto"
ENV_SWITCH = "HF_AUTOROUND_AUTOLOAD"


class _RegisterAfterLoad:
    """Wraps the real loader of the target module and registers the plugin once the module has executed."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from hf_autoround.registration import register

        register()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install():
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if _TARGET in sys.modules:  # transformers was imported before us: register right away
        from hf_autoround.registration import register

        register()
        return
    sys.meta_path.insert(0, _Finder())


install()
