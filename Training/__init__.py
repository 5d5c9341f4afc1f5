"""LTDiffPP training package (``python -m Training``).

Today it creates model files (``python -m Training init``); the three training phases, DDP and the
default model arrive with the Training issue.
"""
