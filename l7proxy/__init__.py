"""l7proxy: an L7-aware proxy with kernel redirection."""

__version__ = "0.1.0"
