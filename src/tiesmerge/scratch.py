"""Private scratch folders for the caches other libraries keep, so a run writes nothing outside
its inputs, its output and tiesmerge's digest cache (README, Safety)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

__all__ = ["private_folder_for", "remove_private_folders"]

_FOLDERS: list[str] = []


def private_folder_for(env_var: str, prefix: str) -> None:
    """Unless the user set ``env_var`` (a library's cache or config folder), point it at a new
    temporary folder that is removed when the process exits. Must run before that library
    first reads the variable."""
    if os.environ.get(env_var):
        return
    folder = tempfile.mkdtemp(prefix=prefix)
    _FOLDERS.append(folder)
    os.environ[env_var] = folder


@atexit.register
def remove_private_folders() -> None:
    """Remove the folders made so far (at exit; the console script, which leaves with ``os._exit``
    and so runs no atexit hook, calls it itself)."""
    while _FOLDERS:
        shutil.rmtree(_FOLDERS.pop(), ignore_errors=True)
