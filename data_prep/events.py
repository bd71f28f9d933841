"""What the corpus readers stream, and the per-source counts those events add up to.

Each source yields, in a deterministic order:

    Doc   a piece of a document (long documents come in pieces)
    Skip  a document that was read and dropped, and why
    Fix   the document being read was repaired (decoding, NUL bytes), and how
    Page  one raw <page> block of a MediaWiki dump; wikidump.wiki_page turns it into the events
          above in a worker process, because XML parsing is half the reader's cost

Named tuples rather than dataclasses: readers yield one per document or page, and they cross
process boundaries by the thousand, so they should pickle small and build fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Union


class Doc(NamedTuple):
    key: str  # the document's stable name; its hash places it in the split's walk (split.py)
    text: str
    first: bool  # the document's first piece
    last: bool  # the document's last piece
    # None for plain text; for wiki markup still to be cleaned, the dump's localized non-prose
    # namespace names (possibly empty), which the cleaner needs.
    wiki: tuple[str, ...] | None = None


class Skip(NamedTuple):
    reason: str  # a key of the manifest's "skipped"


class Fix(NamedTuple):
    reason: str  # a key of the manifest's "repaired"


class Page(NamedTuple):
    dump: str  # the dump file's name: the prefix of its documents' keys
    xml: bytes  # the whole <page>...</page> block, UTF-8
    non_prose: tuple[str, ...]  # the dump's localized File and Category namespace names


Event = Union[Doc, Skip, Fix, Page]


@dataclass
class SourceCounts:
    """What happened to one source's documents (one chunk's share while in flight, the whole
    source's in the build state). Becomes the source's entry in manifest.json."""

    documents_read: int = 0
    """Documents (or dump pages) read, kept or not."""
    documents_kept: int = 0
    """Documents that gave at least one token."""
    kept_by_split: dict[str, int] = field(default_factory=dict)
    """Split name -> documents kept in it."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> documents dropped for it."""
    repaired: dict[str, int] = field(default_factory=dict)
    """Reason -> documents repaired for it."""

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def repair(self, reason: str) -> None:
        self.repaired[reason] = self.repaired.get(reason, 0) + 1

    def count(self, event: Skip | Fix) -> None:
        """A Skip or Fix event (a Skip's document was already counted as read, or is here)."""
        if isinstance(event, Skip):
            self.skip(event.reason)
        else:
            self.repair(event.reason)

    def keep(self, split: str) -> None:
        self.documents_kept += 1
        self.kept_by_split[split] = self.kept_by_split.get(split, 0) + 1

    def add(self, other: SourceCounts) -> None:
        self.documents_read += other.documents_read
        self.documents_kept += other.documents_kept
        for mine, theirs in ((self.kept_by_split, other.kept_by_split),
                             (self.skipped, other.skipped), (self.repaired, other.repaired)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def copy(self) -> SourceCounts:
        c = SourceCounts()
        c.add(self)
        return c

    def empty(self) -> bool:
        return not (self.documents_read or self.documents_kept or self.skipped or self.repaired)

    def to_json(self) -> dict:
        """For the build's state.json (read back by from_json)."""
        return {"documents_read": self.documents_read, "documents_kept": self.documents_kept,
                "kept_by_split": self.kept_by_split, "skipped": self.skipped,
                "repaired": self.repaired}

    @classmethod
    def from_json(cls, d: dict) -> SourceCounts:
        return cls(d["documents_read"], d["documents_kept"], dict(d["kept_by_split"]),
                   dict(d["skipped"]), dict(d["repaired"]))

    def manifest_entry(self, spec: str, kind: str, splits: tuple[str, ...]) -> dict:
        # Reasons sorted: the summary printed at the end of a build lists them in this order.
        return {"spec": spec, "kind": kind, "documents_read": self.documents_read,
                "documents_kept": self.documents_kept,
                "documents_by_split": {s: self.kept_by_split.get(s, 0) for s in splits},
                "skipped": dict(sorted(self.skipped.items())),
                "repaired": dict(sorted(self.repaired.items()))}
