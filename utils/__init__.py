"""Helpers behind the repository's scripts: train.py, validate.py and the analysis tools."""
