"""Procedural data sets made on the spot (nothing downloaded): see :mod:`pipelines.datasets.shapes`."""
