"""``python -m tiesmerge``: the same as the ``tiesmerge`` command."""

from ._launch import entry

if __name__ == "__main__":
    entry()
