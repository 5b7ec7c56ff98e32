"""What every check result shares: ``ok`` and a one-line ``message``, with the aliases users reach for."""
from __future__ import annotations


class Outcome:
    """Mixin for check results (dataclasses with ``ok: bool`` and ``message: str``)."""

    ok: bool
    message: str

    def summary(self) -> str:
        return self.message

    @property
    def passed(self) -> bool:
        """Alias of ``ok``."""
        return self.ok

    @property
    def verdict(self) -> str:
        return "pass" if self.ok else "fail"
