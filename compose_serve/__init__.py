"""compose-serve: language models composed at decoding time, served behind the OpenAI API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("compose-serve")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
