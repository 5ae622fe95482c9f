"""quantfleet: quantized language models on edge devices, rolled out in safe steps.

The repository's top-level folders install as subpackages of this one:
``agent/`` is ``quantfleet.agent`` (device side), ``fleet/`` is
``quantfleet.fleet`` (operator side) and ``models/`` is ``quantfleet.models``
(variant catalog, ladder recipes, golden sets). ``quantfleet.strict`` is what
they all build on: the one strict pydantic base and its error messages.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("quantfleet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
