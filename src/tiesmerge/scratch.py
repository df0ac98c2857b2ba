"""Private scratch folders for the caches other libraries keep, so a run writes nothing outside
its inputs, its output and tiesmerge's digest cache (README, Safety)."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile

__all__ = ["private_folder", "private_folder_for", "remove_private_folders", "host_tag", "process_is_dead",
           "scratch_dir", "discard"]

_FOLDERS: list[str] = []
# "<prefix><host>-<pid>-<random>": a folder of this host whose process is dead (a run killed outright) is removed by
# the next run; another host's (a TMPDIR shared by a cluster's nodes, or by containers) is never touched, since its
# pid means nothing here
# tiesmerge-analyze-: analyze --method's compared merges (hp68a c60: a killed run's stayed in /tmp for good)
# tiesray-: Ray's folder, short since Ray's socket paths under it must fit 107 bytes (tiesmerge-ray-: before pass 34)
_OURS = re.compile(r"^(tiesmerge-(?:torch|matplotlib|ray|numba|analyze)|tiesray)-"
                   r"([0-9a-f]{8})-([0-9]{1,7})-[A-Za-z0-9_]+$")
MAX_PID = 2**22  # Linux's largest pid_max: a name holding a larger number was never made by a tiesmerge process
# the file each private folder tiesmerge makes holds from its creation on (as io.writer marks its temporaries): a dead
# run's folder is removed only with it, or when it holds no file at all (torch's, which torch makes itself), never a
# user's folder that merely has such a name, with data in it
MARK = ".tiesmerge-temporary"


def private_folder_for(env_var: str, prefix: str, *, create: bool = True) -> None:
    """Unless the user set ``env_var`` (a library's cache or config folder), point it at a new
    temporary folder that is removed when the process exits. Must run before that library
    first reads the variable. ``create=False``: only its name, for a library that makes its folder when it first
    needs it (torch's inductor cache): a command refused before then made nothing in $TMPDIR, which may lie in an
    input (hp40b C16)."""
    given = os.environ.get(env_var)
    if given and not _inside_an_input_or_output(env_var, given):
        return
    os.environ[env_var] = private_folder(prefix) if create else _private_name(prefix)


def _inside_an_input_or_output(env_var: str, folder: str) -> bool:
    """A user's cache folder that lies in the running command's inputs or output (``NUMBA_CACHE_DIR=OUT``): the
    library's files would land there, and the finished output be refused as holding files tiesmerge did not write
    (hp70b c33, c42). Said, and a private folder taken instead for this run."""
    from .io.card import kept_out

    if not kept_out(folder):
        return False
    import warnings

    from .errors import MergeWarning

    warnings.warn(MergeWarning(f"{env_var}={folder} lies in this command's inputs or output, where nothing else may "
                               "be written: a private temporary folder is used instead for this run"), stacklevel=4)
    return True


def private_folder(prefix: str) -> str:
    """A new temporary folder ``<prefix><host>-<pid>-<random>`` (``prefix``: one of ``_OURS``'s), removed when the
    process exits, for a library that takes its folder as an argument (Ray's ``_temp_dir``)."""
    _remove_stale(tempfile.gettempdir())
    folder = tempfile.mkdtemp(prefix=f"{prefix}{host_tag()}-{os.getpid()}-")
    _FOLDERS.append(folder)
    with open(os.path.join(folder, MARK), "x"):  # what lets a later run tell it from a user's folder of that name
        pass
    return folder


def discard(folder: str) -> None:
    """Remove a private folder now, before the process exits."""
    shutil.rmtree(folder, ignore_errors=True)
    if folder in _FOLDERS:
        _FOLDERS.remove(folder)


def _private_name(prefix: str) -> str:
    """The name of a private folder not made yet (see private_folder), in :func:`scratch_dir`, removed at exit if a
    library made it."""
    import secrets

    _remove_stale(scratch_dir())  # a killed run's folders go, as private_folder removes them
    folder = os.path.join(scratch_dir(), f"{prefix}{host_tag()}-{os.getpid()}-{secrets.token_hex(6)}")
    _FOLDERS.append(folder)
    return folder


def scratch_dir() -> str:
    """The temporary folder, as tempfile.gettempdir() finds it, without its probe: gettempdir() creates and removes a
    file there to see that it is writable, which changed an input's folder when $TMPDIR lay in it, before tiesmerge
    could refuse that (hp40b C16). The first of $TMPDIR, $TEMP, $TMP that is a folder, else /tmp."""
    cached = tempfile.tempdir  # set once gettempdir() ran (or by the user): what every library uses then
    if cached:
        return cached
    for name in ("TMPDIR", "TEMP", "TMP"):
        value = os.environ.get(name)
        if value and os.path.isdir(value):
            return os.path.abspath(value)
    return "/tmp" if os.path.isdir("/tmp") else os.getcwd()


def host_tag() -> str:
    """This machine, as temporary names record it (8 hex digits of its name's sha256, as io.writer's)."""
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def process_is_dead(digits: str) -> bool:
    """Whether the process id a temporary name carries is of a process of this machine that has ended: its folder
    is left from a killed run and may go. A number no process can have (0, past pid_max: a name planted in a shared
    /tmp, hostile pass 25 F5) is no dead process of ours: its folder is left alone, never a reason to fail."""
    if not digits.isascii() or not digits.isdigit() or len(digits) > 7 or not 0 < int(digits) <= MAX_PID:
        return False
    try:
        os.kill(int(digits), 0)
    except ProcessLookupError:
        return True
    except OSError:  # someone else's live process (EPERM)
        return False
    return False


def _remove_stale(parent: str) -> None:
    host = host_tag()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = _OURS.match(entry.name)
        if m is None or m.group(2) != host or m.group(3) == str(os.getpid()) or not entry.is_dir(follow_symlinks=False):
            continue
        if process_is_dead(m.group(3)) and _ours_to_remove(entry.path):  # left by a run killed before it could
            shutil.rmtree(entry.path, ignore_errors=True)  # remove it


def _ours_to_remove(folder: str) -> bool:
    """Whether a dead run's private folder may go: it holds tiesmerge's mark (a regular file, not a link), or no file
    at all (removing it loses nothing)."""
    try:
        if os.path.isfile(os.path.join(folder, MARK)) and not os.path.islink(os.path.join(folder, MARK)):
            return True
        return not any(files for _, _, files in os.walk(folder))
    except OSError:
        return False


@atexit.register
def remove_private_folders() -> None:
    """Remove the folders made so far (at exit; the console script, which leaves with ``os._exit``
    and so runs no atexit hook, calls it itself)."""
    while _FOLDERS:
        shutil.rmtree(_FOLDERS.pop(), ignore_errors=True)
