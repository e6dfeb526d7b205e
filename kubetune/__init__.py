"""kubetune's shared contract: the FineTuneJob model, ids, object-store layout and settings.

Every component (API, operator, trainer) imports from here and from nowhere else in the
project, so this package must not import any of them.
"""

from kubetune.version import __version__

__all__ = ["__version__"]
