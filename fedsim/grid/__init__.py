"""A compare grid: models × defences (× datasets × seeds), one short audited federation per cell,
one row per cell in `compare.csv`. `fedsim.compare` (in `fedsim.api`) and `fedsim compare` run it.

`spec` parses and checks a grid, `runner` runs and resumes its cells, `row` reads a finished run
directory back into a row, `security` computes a cell's security report, `report` writes the
HTML page. Importing the package stays light: torch and Flower load with the modules that need them.
"""
