"""``vision-transfer`` and ``python -m vision_transfer.cli``; the entry point is :mod:`vision_transfer.app.cli`."""

from vision_transfer.app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
