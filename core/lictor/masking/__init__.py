"""Masking engine."""
