"""foldserve: train BN networks, fold their BatchNorms, export to ONNX, serve them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("foldserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
