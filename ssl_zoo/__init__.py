"""ssl_zoo: visual pre-training methods built from shared, tested parts."""

__version__ = "0.1.0"
