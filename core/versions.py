"""Versions of mergetune and the libraries that shape its numbers, recorded with every trial and export."""

from __future__ import annotations

from importlib import metadata

_PACKAGES = ("mergetune", "torch", "transformers", "lm-eval", "optuna", "ray", "safetensors")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
