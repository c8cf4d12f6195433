"""What the installed Detectron2 and torch can do here."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def has_compiled_ops() -> bool:
    """True when Detectron2's compiled extension is real (not steel-fsd's installer stand-in)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "IS_STUB", False)
