"""The M4V model: ``from m4v.model import M4V``."""

from m4v.model.m4v import M4V

__all__ = ["M4V"]
