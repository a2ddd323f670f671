"""gtp5g-op: an operator for free5GC gtp5g user planes scheduled by Gthulhu."""

__version__ = "0.1.0"
