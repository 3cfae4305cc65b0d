"""wsi-deepr: single-shot computational refocusing of microscopy images (Deep-R)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsi-deepr")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
