"""Failures: real traces (traces.py: the CSV format and its strict reader) and synthetic ones with fits to real
ones (synthetic.py). The start of the data flow: trace -> replay -> report."""
