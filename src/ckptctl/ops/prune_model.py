"""prune's data: the policy, each checkpoint's decision (with the snapshot of its files taken
when the plan was made), the plan and the outcome of carrying it out."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptctl.errors import CkptError
from ckptctl.ops.runs import RunCheckpoint
from ckptctl.ops.runs.tf import StateRewrite


class PruneError(CkptError):
    """Deletion stopped part-way; the message says what was and was not deleted."""


@dataclass
class Policy:
    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: str | None = None
    mode: str | None = None  # min | max; None: from the Lightning callback, else from the name
    best_n: int = 1
    keep_steps: list[int] = field(default_factory=list)
    keep_since: float | None = None  # seconds
    keep_since_text: str | None = None
    exp_spacing: bool = False
    min_age: float = 120.0
    min_age_text: str = "2m"
    include_broken: bool = False

    def any(self) -> bool:
        return bool(
            self.keep_last
            or self.keep_every
            or self.keep_best
            or self.keep_steps
            or self.keep_since is not None
            or self.exp_spacing
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "keep_last": self.keep_last,
            "keep_every": self.keep_every,
            "keep_best": self.keep_best,
            "mode": self.mode,
            "best_n": self.best_n if self.keep_best else None,
            "keep_steps": self.keep_steps or None,
            "keep_since": self.keep_since_text,
            "exp_spacing": self.exp_spacing,
            "min_age": self.min_age_text,
            "include_broken": self.include_broken,
        }


@dataclass(frozen=True)
class FileSnap:
    path: Path
    dev: int
    ino: int
    size: int
    mtime_ns: int
    mode: int

    @classmethod
    def take(cls, p: Path) -> FileSnap:
        st = os.lstat(p)
        return cls(p, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, stat.S_IFMT(st.st_mode))

    def same_as(self, other: FileSnap) -> bool:
        return (self.dev, self.ino, self.size, self.mtime_ns, self.mode) == (
            other.dev,
            other.ino,
            other.size,
            other.mtime_ns,
            other.mode,
        )


@dataclass(frozen=True)
class RemoteSnap:
    """An object as the listing showed it when the plan was made."""

    path: Any  # RemotePath
    size: int
    etag: str | None
    generation: str | None

    @classmethod
    def of(cls, path, info: dict) -> RemoteSnap:
        etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        gen = info.get("generation") or info.get("VersionId") or info.get("version_id")
        return cls(
            path,
            int(info.get("size") or 0),
            str(etag).strip('"') if etag else None,
            str(gen) if gen is not None else None,
        )

    def same_as(self, other: RemoteSnap) -> bool:
        if self.size != other.size:
            return False
        if self.etag and other.etag and self.etag != other.etag:
            return False
        return not (self.generation and other.generation and self.generation != other.generation)


def _remote(p) -> bool:
    from ckptctl.sources import RemotePath

    return isinstance(p, RemotePath)


@dataclass
class Decision:
    ckpt: RunCheckpoint
    keep: bool
    reasons: list[str]
    root: Path  # the run folder given on the command line (the deletion boundary)
    snapshot: list[Any] = field(default_factory=list)  # FileSnap (local) or RemoteSnap
    protected_by: list[str] = field(default_factory=list)  # protections that apply
    kept_by: list[str] = field(default_factory=list)  # policies that keep it

    @property
    def action(self) -> str:
        return "keep" if self.keep else "delete"

    def to_json(self) -> dict[str, Any]:
        c = self.ckpt
        return {
            "path": os.fspath(c.path),
            "run": os.fspath(c.run) if c.run else None,
            "step": c.step,
            "epoch": c.epoch,
            "format": c.format,
            "action": self.action,
            "reasons": self.reasons,
            "protected_by": self.protected_by,
            "kept_by": self.kept_by,
            "total_bytes": c.size,
            "files": [os.fspath(f) for f in c.files],
            "metrics": c.metrics,
            "aliases": c.aliases,
            "mtime": c.mtime,
            "error": c.error,
        }


@dataclass
class Plan:
    decisions: list[Decision]
    policy: Policy
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def to_delete(self) -> list[Decision]:
        return [d for d in self.decisions if not d.keep]

    @property
    def to_keep(self) -> list[Decision]:
        return [d for d in self.decisions if d.keep]

    @property
    def bytes_freed(self) -> int:
        return sum(d.ckpt.size for d in self.to_delete)


@dataclass
class Outcome:
    done: list[Decision] = field(default_factory=list)  # deleted (or moved)
    failed: Decision | None = None
    failed_message: str | None = None
    partial: list[Path] = field(default_factory=list)  # files of `failed` already removed
    not_attempted: list[Decision] = field(default_factory=list)
    moved_to: dict[str, str] = field(default_factory=dict)
    state_files: list[StateRewrite] = field(default_factory=list)  # TF `checkpoint` files rewritten
    remote: bool = False
    skipped: list[Decision] = field(default_factory=list)  # remote: an object changed since the plan
    skipped_messages: list[str] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(d.ckpt.size for d in self.done)

    def to_json(self) -> dict[str, Any]:
        out = self._json()
        if self.remote:
            out["skipped"] = [
                {"path": os.fspath(d.ckpt.path), "why": m} for d, m in zip(self.skipped, self.skipped_messages)
            ]
        return out

    def _json(self) -> dict[str, Any]:
        return {
            "done": [os.fspath(d.ckpt.path) for d in self.done],
            "failed": os.fspath(self.failed.ckpt.path) if self.failed else None,
            "error": self.failed_message,
            "partially_removed_files": [os.fspath(p) for p in self.partial],
            "not_attempted": [os.fspath(d.ckpt.path) for d in self.not_attempted],
            "moved_to": self.moved_to or None,
            "state_files": [s.to_json() for s in self.state_files],
            "bytes_freed": self.bytes_freed,
        }
