"""What kind of mail a mail is: the classify step's finding (see :mod:`ingest.steps.classify`).

Its own module because two sides hold it: the pipeline's context, and a parsed mail whose
classification a replay helper computed ahead (:mod:`ingest.prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MailKind = Literal["normal", "auto-reply", "bounce", "bulk"]


@dataclass(slots=True)
class Classification:
    kind: MailKind = "normal"
    reasons: list[str] = field(default_factory=list)  # which headers said so
    referenced_ids: list[str] = field(default_factory=list)  # ids quoted inside a bounce

    @property
    def is_automatic(self) -> bool:
        return self.kind != "normal"
