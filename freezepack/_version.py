"""The one place the version is written: pyproject.toml reads it (dynamic version), ``freezepack.__version__``
re-exports it, and every .fpk records it as its producer."""
__version__ = "0.1.0"
