"""``python -m ova2img``: the same as the ``ova2img`` command."""

from __future__ import annotations

import sys

try:
    from .cli import run
except KeyboardInterrupt:  # Ctrl-C while the modules load: nothing was started yet
    sys.stderr.write("ova2img: interrupted\n")
    raise SystemExit(130) from None

if __name__ == "__main__":
    run()
