"""``python -m lightning_mim``: the ``lightning-mim`` command."""

from lightning_mim.cli import main

if __name__ == "__main__":
    main()
