"""gtp5g-op: an operator for free5GC gtp5g user planes scheduled by Gthulhu."""

from pathlib import Path

__version__ = "0.1.0"

# Bundled data: the lab capture, and links to the export set (patches/) and the tracer sources (tracer/),
# which setuptools copies into an installed package.
DATA_DIR = Path(__file__).resolve().parent / "data"
