"""``python -m tiesmerge``: the same as the ``tiesmerge`` command."""

import sys

# `python -m` puts the working folder first on the import path, so a yaml.py or numpy.py lying there (a downloaded
# model's folder, say) would run in place of the library at its first import (hostile pass 35, E74). The command
# needs nothing from there: the installed `tiesmerge` script has no such entry, and an --evaluator MODULE:FUNCTION
# is looked up in the working folder last (cli.commands._load_callable). Removed before anything else is imported.
if sys.path and not sys.flags.safe_path:
    import os

    try:
        _here = os.path.realpath(os.getcwd())
    except OSError:  # a working folder deleted meanwhile: nothing lies there; the command says so (hp53 c27)
        _here = None
    if sys.path[0] in ("", ".") or os.path.realpath(sys.path[0]) == _here:
        del sys.path[0]

try:
    from ._launch import entry
except KeyboardInterrupt:  # Ctrl-C in the first milliseconds, before entry()'s own guard (hostile pass 33, C154)
    print("error: interrupted; no output directory was left behind", file=sys.stderr)
    raise SystemExit(130) from None

if __name__ == "__main__":
    entry()
