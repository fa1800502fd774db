"""``python -m ova2img``: the same as the ``ova2img`` command."""

from __future__ import annotations

from .cli import run

if __name__ == "__main__":
    run()
