"""Shared foundation of factory-edge: the error tree, units and logging."""

__version__ = "0.1.0"
