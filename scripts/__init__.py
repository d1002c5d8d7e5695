"""The unet25d_mra bundle's Python package: operators, network, training and data code.

Configs reach it as ``scripts.<module>.<Name>``; run the bundle from its root so that
``scripts`` is importable.
"""
