"""Objects of the object store streamed as one tar archive, with its length known up front.

A model's weights are hundreds of megabytes to many gigabytes: the archive is never built in
memory or on disk. Each member's header comes from :mod:`tarfile` (POSIX pax format, so long
names need no tricks), its bytes stream from the store (verified against their sha256 as they
are read), then the padding to the 512-byte block and, at the end, the two zero blocks that
close a tar archive. ``Content-Length`` is exact, so clients show real progress.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from kubetune_runtime.objectstore import ObjectStore

BLOCK: Final = tarfile.BLOCKSIZE
END_OF_ARCHIVE: Final = b"\0" * (2 * BLOCK)


@dataclass(frozen=True)
class Member:
    """One file of the archive: its path inside it, and the object it is read from."""

    name: str
    key: str
    size: int
    mtime: float

    def header(self) -> bytes:
        """The member's tar header (a pax header first when the name needs one)."""
        info = tarfile.TarInfo(self.name)
        info.size = self.size
        info.mtime = int(self.mtime)
        info.mode = 0o644
        return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> int:
    return -size % BLOCK


def archive_length(members: Sequence[Member]) -> int:
    """The exact length of the archive :func:`stream_archive` writes."""
    body = sum(len(m.header()) + m.size + _padding(m.size) for m in members)
    return body + len(END_OF_ARCHIVE)


def stream_archive(store: ObjectStore, members: Sequence[Member]) -> Iterator[bytes]:
    """The archive, chunk by chunk. An object that changed size since it was listed ends the
    stream with an error rather than a corrupt archive.
    """
    for member in members:
        yield member.header()
        sent = 0
        with store.open_stream(member.key) as reader:
            for chunk in reader:
                sent += len(chunk)
                yield chunk
        if sent != member.size:
            raise OSError(f"{member.key} is {sent} bytes, not the {member.size} listed")
        yield b"\0" * _padding(member.size)
    yield END_OF_ARCHIVE
