"""Fault injection for tests and chaos drills: a process exits abruptly at a named point.

``KUBETUNE_FAULT=after-pytorchjob-create`` makes the operator (or local mode) exit as if
SIGKILLed right after it created a PyTorchJob. It proves that a pass can die anywhere and that
the next one adopts what the dead one created; nothing is cleaned up on the way out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

FAULT_ENV: Final = "KUBETUNE_FAULT"
FAULT_EXIT_CODE: Final = 137


@dataclass(frozen=True)
class Faults:
    """The fault points asked for in this process."""

    points: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Faults:
        """The points named (comma-separated) in ``KUBETUNE_FAULT``."""
        return cls(frozenset(filter(None, env.get(FAULT_ENV, "").split(","))))

    def hit(self, point: str) -> None:
        """Exit the process abruptly if ``point`` was asked for."""
        if point in self.points:
            log.warning("fault injection: exiting at %s", point)
            os._exit(FAULT_EXIT_CODE)
