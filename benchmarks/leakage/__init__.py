"""Leakage: attacks, defences, the security metric and the compare grids, measured."""
