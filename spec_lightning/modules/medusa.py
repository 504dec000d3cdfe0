"""The former ``MedusaModule``: split into :class:`~spec_lightning.modules.medusa1.Medusa1Module` (Medusa-1, heads on
a frozen target) and :class:`~spec_lightning.modules.medusa2.Medusa2Module` (Medusa-2, heads and base jointly).

The name stays so that a config or script naming it fails with one line saying which class to use; its checkpoints
load into the new classes: through the CLI (``spec_lightning.modules.renamed``) and, once this module is imported, with
``Medusa1Module.load_from_checkpoint`` / ``Medusa2Module.load_from_checkpoint``.
"""

from __future__ import annotations

from typing import Any, NoReturn

from spec_lightning.modules.medusa1 import Medusa1Module
from spec_lightning.modules.medusa2 import Medusa2Module
from spec_lightning.modules.renamed import MEDUSA_MODULE, renamed_class_message


def _refuse(mode: str) -> NoReturn:
    raise ValueError(renamed_class_message(MEDUSA_MODULE, {"mode": mode}))


class MedusaModule(Medusa2Module, Medusa1Module):
    """Removed: use ``Medusa1Module`` (``mode: medusa1``) or ``Medusa2Module`` (``mode: medusa2``).

    Never built. A subclass of both so that ``Medusa1Module.load_from_checkpoint`` / ``Medusa2Module...`` accept the
    class path its checkpoints name (Lightning loads them only into a superclass of an imported class).

    Args:
        mode: the old switch between the two algorithms.
    """

    def __init__(self, mode: str = "medusa1", **kwargs: Any) -> None:
        _refuse(mode)
        super().__init__(**kwargs)  # not reached; it tells the config parser which settings the old class took
