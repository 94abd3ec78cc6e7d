"""cpg-daemon: unattended, resumable uploads into the Cell Painting Gallery staging bucket."""

__version__ = "0.1.0"
