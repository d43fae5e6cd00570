"""Lictor's built-in protocol addons. They use only the public ``lictor`` API."""
