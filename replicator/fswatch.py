"""Linux inotify on one file: the sidecar's poller sleeps on it while the file is quiet.

A ``FileWatch`` watches the file itself for writes (``IN_MODIFY``), and its
directory for the name being created, renamed or removed (a pack renames a
new file into place), so ``changed()`` answers "did anything happen to this
path since I last asked?" without a ``stat``.  Only the kernel's queue is
read; nothing here blocks.

No library: the three calls are in the C library, through ``ctypes``.  On
other systems, or when the kernel refuses (inotify limits reached), the
constructor raises ``OSError`` and the caller polls instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import sys

__all__ = ["FileWatch"]

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = 0o2000000

_FILE_MASK = IN_MODIFY | IN_ATTRIB | IN_MOVE_SELF | IN_DELETE_SELF
_DIR_MASK = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_ONLYDIR
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name

_libc = None


def _c_library():
    global _libc
    if _libc is None:
        if not sys.platform.startswith("linux"):
            raise OSError(errno.ENOSYS, "inotify is Linux only")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        _libc = libc
    return _libc


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class FileWatch:
    """Pending inotify events about one path, read without blocking."""

    def __init__(self, path: str) -> None:
        # A symlinked Data.fs: watch the real file and the directory a pack renames in.
        self.path = os.path.realpath(path)
        self._name = os.fsencode(os.path.basename(self.path))
        libc = _c_library()
        self._add = libc.inotify_add_watch
        self.fd = _check(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
        try:
            self._dir_wd = _check(self._add(self.fd, os.fsencode(os.path.dirname(self.path)), _DIR_MASK),
                                  f"watching {os.path.dirname(self.path)}")
            self._file_wd = _check(self._add(self.fd, os.fsencode(self.path), _FILE_MASK),
                                   f"watching {self.path}")
        except OSError:
            os.close(self.fd)
            raise
        #: The directory watch went away (directory removed or unmounted): ask nothing more of this watch.
        self.lost = False

    def fileno(self) -> int:
        return self.fd

    def changed(self) -> bool:
        """Whether any event about the path came since the last call (and forget them)."""
        found = False
        while True:
            try:
                buf = os.read(self.fd, 64 << 10)
            except BlockingIOError:
                return found
            except InterruptedError:
                continue
            if not buf:
                return found
            found |= self._parse(buf)

    def _parse(self, buf: bytes) -> bool:
        found = False
        pos = 0
        while pos + _EVENT.size <= len(buf):
            wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
            name = buf[pos + _EVENT.size:pos + _EVENT.size + length].rstrip(b"\0")
            pos += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                found = True  # events were dropped: assume the worst
            elif wd == self._dir_wd:
                if mask & IN_IGNORED:
                    self.lost = True
                    found = True
                elif name == self._name:
                    found = True
                    if mask & (IN_CREATE | IN_MOVED_TO):
                        self._rewatch()
            elif wd == self._file_wd:
                # A write, or the file renamed or removed under its name; a
                # watch dropped by the kernel (IN_IGNORED) follows the latter.
                found = True
            # else: the watch of a file this name no longer names
        return found

    def _rewatch(self) -> None:
        """A new file took the name (a pack renames one into place): watch it instead."""
        wd = self._add(self.fd, os.fsencode(self.path), _FILE_MASK)
        if wd >= 0:
            self._file_wd = wd
        # else: gone again already; the next directory event says what came instead

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
