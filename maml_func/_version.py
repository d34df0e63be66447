"""The package's version, in a module of its own so that code inside the package never imports its front file."""

__version__ = "0.1.0"
