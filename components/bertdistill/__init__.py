"""bertdistill: distil a small BERT from a big one on fresh Wikipedia."""

__version__ = "0.1.0"
