"""``python -m tiesmerge``: the same as the ``tiesmerge`` command."""

try:
    from ._launch import entry
except KeyboardInterrupt:  # Ctrl-C in the first milliseconds, before entry()'s own guard (hostile pass 33, C154)
    import sys

    print("error: interrupted; no output directory was left behind", file=sys.stderr)
    raise SystemExit(130) from None

if __name__ == "__main__":
    entry()
