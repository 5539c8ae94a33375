"""The name :mod:`ckptstore.integrations.training` had before it moved into ``integrations/``:
an alias of that module (the same module object), so code that imports ``ckptstore.training``
keeps working. New code imports ``ckptstore.integrations.training``."""

import sys

from .integrations import training as _module
from .integrations.training import *  # noqa: F403  (what type checkers see; at run time the alias below)

sys.modules[__name__] = _module
