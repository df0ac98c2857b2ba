"""``python -m tiesmerge``: the same as the ``tiesmerge`` command."""

from .cli.main import entry

if __name__ == "__main__":
    entry()
