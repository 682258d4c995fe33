"""cldcb: continuous, encrypted, off-site backup for Core Lightning nodes."""

__version__ = "0.1.0"
