"""Command-line interface (``cbir``)."""
