"""Factored layers: the `FactoredLayer` protocol (`base`), the parameterization registry (`registry`) and one module
per parameterization. Importing the package registers the built-in parameterizations."""

from hf_svd_compress.layers import conv, cur, householder, svd

__all__ = ["conv", "cur", "householder", "svd"]  # imported for their registrations
