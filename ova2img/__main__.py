"""``python -m ova2img``: the same as the ``ova2img`` command."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
