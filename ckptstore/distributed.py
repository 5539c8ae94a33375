"""The name :mod:`ckptstore.integrations.distributed` had before it moved into
``integrations/``: an alias of that module (the same module object), so code that imports
``ckptstore.distributed`` keeps working. New code imports ``ckptstore.integrations.distributed``."""

import sys

from .integrations import distributed as _module
from .integrations.distributed import *  # noqa: F403  (what type checkers see; at run time the alias below)

sys.modules[__name__] = _module
