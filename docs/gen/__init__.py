"""Build-time generators of the documentation's reference and benchmark pages.

Each renderer is a plain function that takes the declaration it documents (a config class, a
registry, a column list, a results folder) and returns Markdown, so the pages are generated from
the one place each thing is declared and a test can hand a renderer a declaration of its own.
`docs/gen/pages.py` is the mkdocs-gen-files script that calls them with the real declarations.
"""
