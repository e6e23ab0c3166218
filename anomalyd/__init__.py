"""anomalyd: listens to machines, learns how they sound when healthy, and reports when they do not."""

__version__ = "0.1.0"
