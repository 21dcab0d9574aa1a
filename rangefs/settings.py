"""Choices and defaults that the command line shows in ``--help``, in a module that imports
nothing of rangefs's own: ``cli.py`` builds its options from these without importing the
mount stack (``objects``, ``listings``, ``urlcommand`` and what they pull in), which only
``rangefs mount`` needs. The modules that use them re-export them under their old names.
"""

from __future__ import annotations

import enum
from typing import Final


class Prefetch(enum.Enum):
    """Background fill policy: which objects are filled without a reader asking."""

    # an opened object read sequentially, or all over (readahead.py), is filled completely
    OPEN = "open"  # (default)
    NONE = "none"  # only what readers ask for (plus sequential read-ahead)
    ALL = "all"  # every object of the list, from mount time


#: Default seconds a directory listing is used before the directory is listed again.
LISTING_TTL: Final = 3600.0
#: Default seconds a --url-command may run before it is killed (and counts as failed).
URL_COMMAND_TIMEOUT: Final = 30.0
