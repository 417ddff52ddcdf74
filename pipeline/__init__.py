"""Pseudo-labeling pipeline for facial expression recognition: data layer, methods and Ray adapters."""

__version__ = "0.1.0"
