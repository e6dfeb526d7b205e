"""The project's version, shared by every component and stamped into run manifests."""

__version__ = "0.1.0"
