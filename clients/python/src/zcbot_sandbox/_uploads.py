"""Upload bodies: bytes, binary file objects, or iterables of bytes, read in bounded chunks."""

from __future__ import annotations

import os
from typing import IO, AsyncIterable, BinaryIO, Iterable, Iterator, Optional, Union

#: Bytes read from a file per piece of an upload, and per piece of a download.
CHUNK = 256 * 1024

#: What ``upload`` takes. (The async client also takes an async iterable of bytes.)
UploadData = Union[bytes, bytearray, memoryview, BinaryIO, IO[bytes], Iterable[bytes]]
AsyncUploadData = Union[UploadData, AsyncIterable[bytes]]


def file_length(f: IO[bytes]) -> Optional[int]:
    """The bytes left in a seekable file from its position, so the upload can announce its length
    (the daemon then refuses one over ZCBOT_MAX_FILE before any byte is sent); None if unknown."""
    try:
        if not f.seekable():
            return None
        here = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(here)
        return max(0, end - here)
    except (AttributeError, OSError, ValueError):
        return None


def read_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while True:
        piece = f.read(CHUNK)
        if not piece:
            return
        if isinstance(piece, str):
            raise TypeError("upload needs a file opened in binary mode ('rb')")
        yield bytes(piece)
