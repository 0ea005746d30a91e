"""molink-lite: serve one GGUF model split by layer range across hosts."""

__version__ = "0.1.0"
