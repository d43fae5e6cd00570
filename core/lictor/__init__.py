"""Lictor: the gateway between autonomous agents and production."""
