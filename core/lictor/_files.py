"""Files of the state directory that hold what agents did."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["private_database"]

# Owner reads and writes, the group reads (auditors), others nothing: the mode of the session recordings.
DATABASE_MODE = 0o640


def private_database(path: str | Path) -> None:
    """Make the SQLite file ``path`` (and its ``-wal``/``-shm`` files) unreadable by other users.

    The audit log, the approval requests and the recordings index hold statements, commands and token claims.
    SQLite creates a database with the umask's mode (0644, readable by every local user), and its WAL files with
    the database's mode: so the database is created here with :data:`DATABASE_MODE` before SQLite opens it, and
    one created by an older version loses the permissions of others.
    """
    if str(path) == ":memory:" or str(path).startswith("file:"):
        return
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, DATABASE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)  # an empty file is an empty database to SQLite
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
            if mode & 0o007:
                os.chmod(name, mode & ~0o007)
        except FileNotFoundError:
            continue
        except PermissionError:
            # Not the file's owner (an auditor's `lictor audit list`): the gateway, which owns it, takes the
            # permissions away when it opens it.
            continue
