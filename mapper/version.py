"""mapper's version, in one place (the package, the records it writes, ``mapper --version``)."""

__version__ = "0.2.0"
