"""Fidelity: each zoo family reproduces its seed paper's result on embedded data."""
