"""The error a user can fix, for every layer (data, modeling, engine) to raise; the tools print it in one line
(:func:`steel_fsd.utils.cli.run_main`)."""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A mistake the user can fix. The message reads ``<what>, <where>, <what to do>``."""

    def __init__(self, what: str, where: str = "", todo: str = ""):
        self.what, self.where, self.todo = what, where, todo
        super().__init__(", ".join(p for p in (what, where, todo) if p))
