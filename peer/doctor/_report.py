"""What doctor reports: one :class:`Finding` per checked item, gathered in a :class:`Report`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Finding:
    """One checked item: its name, the verdict, what was found and what to do."""

    check: str
    status: Status
    message: str
    action: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "check": self.check,
            "status": self.status.value,
            "message": self.message,
            "action": self.action,
        }


@dataclass(frozen=True, slots=True)
class Report:
    """Every finding of one doctor run, in the order checked."""

    config: str
    peer_id: str | None
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return all(f.status is not Status.FAIL for f in self.findings)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def count(self, status: Status) -> int:
        return sum(f.status is status for f in self.findings)

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def to_json(self) -> str:
        return json.dumps(
            {
                "config": self.config,
                "peer": self.peer_id,
                "ok": self.ok,
                "checks": [f.as_dict() for f in self.findings],
            },
            sort_keys=True,
        )

    def to_text(self) -> str:
        lines = [f"peer doctor: {self.peer_id or '?'} ({self.config})"]
        width = max((len(f.check) for f in self.findings), default=0)
        for f in self.findings:
            lines.append(f"{f.status.value:<4}  {f.check:<{width}}  {f.message}")
            if f.action:
                lines.append(f"{'':<4}  {'':<{width}}  -> {f.action}")
        lines.append(
            f"{self.count(Status.FAIL)} FAIL, {self.count(Status.WARN)} WARN, "
            f"{self.count(Status.OK)} OK"
        )
        return "\n".join(lines)
