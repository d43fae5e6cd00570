"""Lictor's built-in protocol addons. They use only the public ``lictor`` API.

The list of default addons is built here, in one place.
"""

from __future__ import annotations

from typing import Any


def default_addons() -> list[Any]:
    """Fresh instances of the built-in protocol addons, in load order."""
    from .http.addon import HttpAddon
    from .postgres.addon import PostgresAddon
    from .ssh.addon import SshAddon

    return [PostgresAddon(), HttpAddon(), SshAddon()]
