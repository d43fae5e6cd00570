"""Lictor addon file for Redis: name it in the gateway config.

    addons:
      - examples/redis/redis_addon.py

The implementation is the ``lictor_redis`` package next to this file. Editing this file reloads
the addon (and the package with it); edits to the package take effect when this file is touched
or the gateway restarts.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
# A reload of this file re-imports the package, so that edits to it take effect too.
for _name in [m for m in sys.modules if m == "lictor_redis" or m.startswith("lictor_redis.")]:
    del sys.modules[_name]

from lictor_redis import RedisAddon  # noqa: E402

addons = [RedisAddon()]
