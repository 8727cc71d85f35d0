"""What commands show on the terminal besides their results (progress bars), shared by every command module."""

from __future__ import annotations

import sys


def progress_bar(description: str):
    """A factory for a bytes progress bar (with bytes/s) on stderr, as ``conversion.engine.run`` expects."""

    def start(total: int):
        from tqdm import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, file=sys.stderr)

    return start
