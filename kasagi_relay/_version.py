from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("kasagi-relay")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
