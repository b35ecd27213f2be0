"""edgellm: run DeepSeek-R1-class language models privately on hardware you own."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgellm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
