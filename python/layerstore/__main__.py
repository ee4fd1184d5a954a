"""``python -m layerstore``: the same command line as the ``layerstore`` script."""

from layerstore.cli import run

if __name__ == "__main__":
    run()
