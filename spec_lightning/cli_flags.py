"""Boolean options of the command line work as bare flags, the way users type them.

jsonargparse gives a ``bool`` parameter (``SpecTrainer.export(overwrite: bool)``) an option that needs a value:
``--overwrite`` alone fails with "expected one argument" while messages and habit say "pass --overwrite". Here every
``bool`` / ``Optional[bool]`` option takes an optional value: ``--overwrite`` means true, and ``--overwrite true`` /
``--overwrite false`` / ``--overwrite=false`` keep working.
"""

from __future__ import annotations

from typing import Any, Optional

BOOL_HINTS = (bool, Optional[bool], bool | None)


def allow_bare_bool_flags(parser: Any) -> None:
    """Let every boolean option of ``parser`` (a jsonargparse parser) be given without a value (= true)."""
    for action in parser._actions:
        if action.option_strings and getattr(action, "_typehint", None) in BOOL_HINTS:
            action.nargs = "?"
            action.const = True
