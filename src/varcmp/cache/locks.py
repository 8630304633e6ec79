"""Writers of one store coordinate with flock on two files inside it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from ..cache_schema import LOCK_NAME, RUN_LOCK_NAME, CacheError, CacheWriteError
from ..cli.markup import lit
from .store import is_hdf5


class Locks:
    """The store's two lock files (flock): `run` held for a whole run, shared by the shards and
    exclusive for a single-process run or a finalize; `meta` around the short metadata sections.
    An HDF5 file is written by one process: one lock file beside it, no metadata lock."""

    def __init__(self, out: Path):
        self.out = out
        if is_hdf5(out):
            self.run_path, self.meta_path = out.with_name(out.name + ".lock"), None
        else:
            self.run_path, self.meta_path = out / RUN_LOCK_NAME, out / LOCK_NAME
        self._run = None

    def _open(self, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return open(path, "a+")
        except OSError as e:
            raise CacheWriteError(f"{self.out}: cannot write to the store ({e.strerror or e})") from None

    def _flock(self, f, how: int) -> bool:
        """False when a non-blocking request would wait."""
        import fcntl

        try:
            fcntl.flock(f, how)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            raise CacheError(f"{self.out}: cannot lock {Path(f.name).name} ({e.strerror or e}); "
                             "the file system must support flock") from None

    def start(self, exclusive: bool, console=None, busy: str | None = None) -> None:
        """Take the run lock: exclusive (refused at once when another run holds it) or shared
        (waits for a single-process run or a finalize to end)."""
        import fcntl

        f = self._open(self.run_path)
        try:
            if exclusive:
                if not self._flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB):
                    raise CacheError(busy or f"{self.out}: another varcmp-extract is writing to this store")
            elif not self._flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB):
                if console is not None:
                    console.print(f"waiting: another varcmp-extract holds {lit(self.out)} (a single-process run, or a "
                                  "finalization)", highlight=False, soft_wrap=True)
                self._flock(f, fcntl.LOCK_SH)
        except BaseException:
            f.close()
            raise
        self._run = f

    def last_writer(self) -> bool:
        """Release this shard's shared run lock; True when no other run holds it, i.e. this is the
        last writer to finish: it then holds the run lock exclusively (until `stop`)."""
        import fcntl

        self._flock(self._run, fcntl.LOCK_UN)
        return self._flock(self._run, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def stop(self) -> None:
        if self._run is not None:
            import fcntl

            fcntl.flock(self._run, fcntl.LOCK_UN)
            self._run.close()
            self._run = None

    @contextmanager
    def meta(self):
        if self.meta_path is None:
            yield
            return
        import fcntl

        f = self._open(self.meta_path)
        try:
            self._flock(f, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


def process_running(pid: int) -> bool:
    """Whether process `pid` still runs (an exited one that its parent has not reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
