"""Resized images by file digest: an image sent again skips its decode and resize.

Two levels: an LRU in the process (``max_bytes``), and optionally a directory that every preprocessing
instance on the host shares (``shared_dir``, best on tmpfs such as /dev/shm; ``shared_max_bytes``). Triton
hands a request to any instance, so a follow-up question about an image usually reaches an instance that
did not resize it; the shared directory makes that a hit too.

A shared entry is one file ``<file digest>.rgb``: an 80-byte header (magic, height, width, the resized
image's content hash as 64 hex digits) and the RGB bytes. Files are written to a temporary name and renamed
into place, so a reader never sees half a file; a file that does not parse is a miss and is removed. Writes
run on a thread of their own (at most 8 waiting; more are dropped), so a request never waits for one, except
``put(write_now=True)``: a new image sent by reference is written by its request, which then queues the
directory's trim (scanning a directory of a thousand entries takes milliseconds) for the writer thread. The
directory is trimmed, oldest first (by modification time, refreshed on every hit), to ``shared_max_bytes``,
and a write is skipped when it would leave the file system less than 10 % or 64 MiB free, whichever is
more (tmpfs is memory, and Triton's own shared-memory regions live on /dev/shm too: with Docker's default
64 MiB /dev/shm nothing is written). The directory's name carries a digest of
the resize settings, so servers with other settings never read each other's entries.

A file touched in the last ``PROTECT_S`` seconds (written, or read as a hit) is not trimmed: ``shared_ref``
hands its path to another process (the llm, in place of the pixels), which reads it with
``read_shared_ref`` within that time. Under a burst of new images the directory may then outgrow
``shared_max_bytes`` for that long (and by the images written by their requests until the writer thread has
trimmed), still within the free-space rule.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import queue
import re
import struct
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

_MAGIC = b"GLMVRGB1"
_HEADER = struct.Struct("<8sII64s")  # magic, height, width, image hash (hex)
MIN_FREE_BYTES = 64 << 20
MIN_FREE_FRACTION = 0.1
PROTECT_S = 10.0
_REF_NAME = re.compile(r"[0-9a-f]{64}\.rgb")


class ResizeCache:
    def __init__(
        self,
        max_bytes: int,
        shared_dir: str | Path | None = None,
        shared_max_bytes: int = 0,
    ) -> None:
        self.max_bytes = max_bytes
        self.shared_dir = Path(shared_dir) if shared_dir is not None and shared_max_bytes > 0 else None
        self.shared_max_bytes = shared_max_bytes
        self._entries: collections.OrderedDict[str, tuple[np.ndarray, str]] = collections.OrderedDict()
        self._bytes = 0
        self.num_shared_hits = 0
        # (key, entry) to write, or (key, None): trim the directory (key's file written by its request)
        self._writes: queue.Queue[tuple[str, tuple[np.ndarray, str] | None]] = queue.Queue(maxsize=8)
        self._writer: threading.Thread | None = None
        self._lock = (
            threading.Lock()
        )  # the LRU and the writer's start: a Preprocessor's image threads share it
        if self.shared_dir is not None:
            self.shared_dir.mkdir(parents=True, exist_ok=True)

    def __contains__(self, key: str) -> bool:
        return key in self._entries or (self.shared_dir is not None and self._path(key).is_file())

    def get(self, key: str, shared: bool = True) -> tuple[np.ndarray, str] | None:
        """(resized RGB [h, w, 3] uint8, read-only: the cached array itself, its content hash), or None.
        ``shared=False``: from this process's LRU only."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
        if self.shared_dir is None or not shared:
            return None
        entry = self._read_shared(key)
        if entry is not None:
            with self._lock:
                self.num_shared_hits += 1
            self._remember(key, entry)
        return entry

    def put(self, key: str, rgb: np.ndarray, image_hash: str | Future, write_now: bool = False) -> str:
        """Keep ``rgb`` (made read-only: `get` hands out the cached array itself) under ``key``; its shared
        file is written on the writer thread, or with ``write_now`` on this one (there when this returns,
        unless the directory's limits skip it: `shared_ref` then finds none; the trim that makes room for
        it runs on the writer thread). ``image_hash`` may be a Future (with ``write_now``): the file's
        pixels are written while another thread computes it. Returns the image hash."""
        rgb.flags.writeable = False
        if write_now and self.shared_dir is not None:
            image_hash = self._write_shared(key, (rgb, image_hash), trim=False)
            self._queue(key, None)  # the room it takes is made on the writer thread, never by a request
        else:
            image_hash = _resolved(image_hash)
            if self.shared_dir is not None:
                self._queue(key, (rgb, image_hash))
        self._remember(key, (rgb, image_hash))
        return image_hash

    def _queue(self, key: str, entry: tuple[np.ndarray, str] | None) -> None:
        """Hand the writer thread ``key``'s entry to write, or (None) the directory's trim."""
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="resize-cache-writer", daemon=True
                )
                self._writer.start()
        with contextlib.suppress(queue.Full):  # the directory is a cache: a write or trim may be skipped
            self._writes.put_nowait((key, entry))

    def shared_ref(self, key: str) -> str | None:
        """The path of ``key``'s file in the shared directory, refreshed (not trimmed for ``PROTECT_S``
        seconds), or None when it has none (yet: writes run on their own thread)."""
        if self.shared_dir is None:
            return None
        path = self._path(key)
        try:
            os.utime(path)
        except OSError:
            return None
        return str(path)

    def shared_header(self, key: str) -> tuple[int, int, str] | None:
        """(height, width, image hash) of ``key``'s shared file from its header alone (the pixels stay
        unread: for a request that sends the file's path, not the pixels), or None when it has no whole
        entry there. Refreshes the file like a hit."""
        if self.shared_dir is None:
            return None
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                result = _header(f.read(_HEADER.size), os.fstat(f.fileno()).st_size)
        except OSError:
            return None
        if result is None:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        with self._lock:
            self.num_shared_hits += 1
        return result

    def flush(self) -> None:
        """Wait until the writes asked so far are done."""
        self._writes.join()

    # -- the process's LRU --------------------------------------------------------------------------

    def _remember(self, key: str, entry: tuple[np.ndarray, str]) -> None:
        size = entry[0].nbytes
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (old, _) = self._entries.popitem(last=False)
                self._bytes -= old.nbytes

    # -- the shared directory -----------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            key, entry = self._writes.get()
            try:
                if entry is None:  # written by its request: only the trim is left
                    self._trim(self.shared_max_bytes)
                else:
                    self._write_shared(key, entry)
            finally:
                self._writes.task_done()

    def _path(self, key: str) -> Path:
        return self.shared_dir / f"{key}.rgb"

    def _read_shared(self, key: str) -> tuple[np.ndarray, str] | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        entry = _parse(data)
        if entry is None:
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: trimmed last
        return entry

    def _write_shared(self, key: str, entry: tuple[np.ndarray, str | Future], trim: bool = True) -> str:
        """Write ``key``'s file unless it is there; ``trim``: make room for it first. The entry's hash may
        be a Future: the pixels are written first, then the header once it is known. Returns the hash."""
        rgb, image_hash = entry
        size = _HEADER.size + rgb.nbytes
        if size > self.shared_max_bytes or self._path(key).is_file():
            return _resolved(image_hash)
        if trim:
            self._trim(self.shared_max_bytes - size)
        # one temporary name per writing thread: a request writing its new image and the writer thread may
        # both write one entry
        tmp = self.shared_dir / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            stat = os.statvfs(self.shared_dir)
            min_free = max(MIN_FREE_BYTES, MIN_FREE_FRACTION * stat.f_blocks * stat.f_frsize)
            if stat.f_bavail * stat.f_frsize - size < min_free:
                return _resolved(image_hash)
            with open(tmp, "wb") as f:
                height, width = rgb.shape[:2]
                f.seek(_HEADER.size)
                f.write(np.ascontiguousarray(rgb).data)
                image_hash = _resolved(image_hash)
                f.seek(0)
                f.write(_HEADER.pack(_MAGIC, height, width, image_hash.encode("ascii")))
            os.replace(tmp, self._path(key))
        except OSError:  # a full or vanished directory costs the cache, never the request
            with contextlib.suppress(OSError):
                tmp.unlink()
        return _resolved(image_hash)

    def _trim(self, budget: int) -> None:
        """Remove the least recently used entries until the directory holds at most ``budget`` bytes."""
        files = []
        with contextlib.suppress(OSError):
            for item in os.scandir(self.shared_dir):
                if item.name.endswith(".rgb"):
                    with contextlib.suppress(OSError):
                        stat = item.stat()
                        files.append((stat.st_mtime, stat.st_size, item.path))
        total = sum(size for _, size, _ in files)
        protected_since = time.time() - PROTECT_S
        for mtime, size, path in sorted(files):
            if total <= budget or mtime > protected_since:
                break
            with contextlib.suppress(OSError):
                os.unlink(path)
            total -= size


def _resolved(image_hash: str | Future) -> str:
    return image_hash.result() if isinstance(image_hash, Future) else image_hash


def _header(header: bytes, file_size: int) -> tuple[int, int, str] | None:
    """(height, width, image hash) of a shared entry's first ``_HEADER.size`` bytes, or None unless they
    parse and the entry's size is ``file_size``."""
    try:
        magic, height, width, image_hash = _HEADER.unpack_from(header)
        if magic != _MAGIC or file_size != _HEADER.size + height * width * 3:
            return None
        return height, width, image_hash.decode("ascii")
    except (struct.error, UnicodeDecodeError):
        return None


def _parse(data: bytes) -> tuple[np.ndarray, str] | None:
    """(RGB [h, w, 3], its image hash) of a shared entry's bytes (a read-only view of them), or None if
    they do not parse."""
    header = _header(data, len(data))
    if header is None:
        return None
    height, width, image_hash = header
    return np.frombuffer(data, np.uint8)[_HEADER.size :].reshape(height, width, 3), image_hash


def shared_resize_dir_name(engine_dir: str | Path) -> str:
    """The name of the shared resize directory of an engine: a digest of what the resized pixels depend on
    (the image processor's settings, its config file, and the preprocessing's resize) and what an entry's
    header holds (the content hash's scheme: v2 hashes large images in parts), so servers with other
    settings or another scheme never read each other's entries."""
    processor_file = Path(engine_dir) / "preprocessor_config.json"
    settings = processor_file.read_bytes() if processor_file.is_file() else b"{}"
    return "glmv-resize-" + hashlib.sha256(b"resize-v2;" + settings).hexdigest()[:16]


def check_shared_ref(ref: str, dir_name: str, field: str = "image_ref") -> Path:
    """``ref`` as a path, if it can name an entry: a ``<64 hex digits>.rgb`` file directly inside a
    directory named ``dir_name`` (so a caller cannot point a reader at any other file); else ValueError
    naming ``field``."""
    path = Path(ref)
    if not path.is_absolute() or path.parent.name != dir_name or not _REF_NAME.fullmatch(path.name):
        raise ValueError(f"{field}: {ref!r} is not an entry of this server's shared image directory")
    return path


@contextlib.contextmanager
def _shared_entry(ref: str, dir_name: str, field: str):
    """The open file of a path from ``shared_ref`` after its header: (file, height, width, image hash);
    ValueError naming ``field`` when it is not one, no longer holds an entry or cannot be read."""
    path = check_shared_ref(ref, dir_name, field)
    try:
        with open(path, "rb", buffering=0) as f:
            header = _header(f.read(_HEADER.size), os.fstat(f.fileno()).st_size)
            if header is None:
                raise ValueError(_gone(ref, field))
            yield (f, *header)
    except OSError as exc:
        raise ValueError(
            f"{field}: {ref!r} could not be read ({exc.strerror}); send the request again"
        ) from None


def _gone(ref: str, field: str) -> str:
    return f"{field}: {ref!r} does not hold a resized image; send the request again"


def shared_ref_size(ref: str, dir_name: str, field: str = "image_ref") -> tuple[int, int]:
    """(height, width) of the image a path from ``shared_ref`` holds (its header only); ValueError naming
    ``field`` as `read_shared_ref`'s."""
    with _shared_entry(ref, dir_name, field) as (_, height, width, _hash):
        return height, width


def read_shared_ref(
    ref: str, dir_name: str, field: str = "image_ref", out: np.ndarray | None = None
) -> tuple[np.ndarray, str]:
    """(RGB [h, w, 3], its image hash) of a path from ``shared_ref`` (``check_shared_ref`` first);
    ValueError naming ``field`` when it is not one or no longer holds an entry. ``out``: a uint8 array of
    exactly the image's bytes to read the pixels into (pinned memory, a slice of several images' buffer);
    else a fresh, writable one (torch takes it as it is)."""
    with _shared_entry(ref, dir_name, field) as (f, height, width, image_hash):
        num_bytes = height * width * 3
        if out is not None and out.nbytes != num_bytes:
            raise ValueError(
                f"{field}: a {width}x{height} image ({num_bytes} bytes), not the {out.nbytes} bytes of "
                "its image_grid_thw"
            )
        rgb = np.empty(num_bytes, np.uint8) if out is None else out
        if f.readinto(memoryview(rgb).cast("B")) != num_bytes:
            raise ValueError(_gone(ref, field))
    return rgb.reshape(height, width, 3), image_hash
