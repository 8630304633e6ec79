"""The two storage backends behind one interface (Zarr directory, HDF5 file), and the test-only fault hook."""

from __future__ import annotations

import json
import os
import signal
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..cache_schema import CacheError, CacheWriteError

FAULT_ENV = "VARCMP_FAULT"  # test-only fault hook, see the docstring of `varcmp.cache_schema`


_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test-only: SIGKILL this process at the N-th arrival at point `name` when `VARCMP_FAULT`
    asks for it (see the docstring of `varcmp.cache_schema`). Does nothing when the variable is unset."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _FAULT_COUNTS[name] = n = _FAULT_COUNTS.get(name, 0) + 1
    for item in spec.split(","):
        point, _, rest = item.strip().partition(":")
        count, _, rank = rest.partition("@")
        if point == name and count.strip().isdigit() and int(count) == n and (
                not rank or os.environ.get("RANK", "0") == rank.strip()):
            os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def writing(path: Path, what: str = "write to the store"):
    """Turn an operating-system error of a write into a one-line CacheWriteError naming the store."""
    try:
        yield
    except CacheError:
        raise
    except OSError as e:
        raise CacheWriteError(f"{path}: cannot {what} ({e.strerror or e})") from None


# --------------------------------------------------------------------------
# Backends: the same small interface over a Zarr group and an HDF5 file.


def is_hdf5(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith((".h5", ".hdf5"))


class _ZarrStore:
    def __init__(self, path: Path, mode: str):
        import zarr

        self.path = path
        self.writable = mode != "r"
        if mode == "r":
            self.root = zarr.open_group(str(path), mode="r")
        else:  # writers look at the store itself: consolidated metadata would hide new arrays
            self.root = zarr.open_group(str(path), mode="a", use_consolidated=False)

    def has(self, key: str) -> bool:
        try:
            self.root[key]
            return True
        except KeyError:
            return False

    def create_array(self, key, shape, dtype, chunks, fill):
        dt = str if dtype == "str" else dtype
        return self.root.create_array(key, shape=shape, dtype=dt, chunks=chunks, fill_value=fill, overwrite=True)

    def array(self, key):
        return self.root[key]

    def read_str(self, key, index=slice(None)) -> np.ndarray:
        return np.asarray(self.root[key][index]).astype(object)

    def get_attrs(self, key: str) -> dict:
        node = self.root if key == "" else self.root[key]
        return dict(node.attrs)

    def set_attrs(self, key: str, attrs: dict) -> None:
        node = self.root if key == "" else self.root.require_group(key)
        node.attrs.update(attrs)

    def groups(self, key: str = "") -> list[str]:
        node = self.root if key == "" else self.root[key]
        with warnings.catch_warnings():  # the writers' lock file, or a .partial file of a killed write
            warnings.filterwarnings("ignore", message=".*not recognized as a component")
            return sorted(node.group_keys())

    def delete(self, key: str) -> None:
        if self.has(key):
            del self.root[key]

    def consolidate(self) -> None:
        import zarr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(self.path))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _H5Store:
    def __init__(self, path: Path, mode: str):
        import h5py

        self.path = path
        self.writable = mode != "r"
        self.f = h5py.File(path, "r" if mode == "r" else "a")

    def has(self, key):
        return key in self.f

    def create_array(self, key, shape, dtype, chunks, fill):
        import h5py

        if key in self.f:
            del self.f[key]
        chunks = tuple(min(c, s) for c, s in zip(chunks, shape)) if all(shape) else None  # HDF5: chunk <= shape
        if dtype == "str":
            return self.f.create_dataset(key, shape=shape, dtype=h5py.string_dtype(), chunks=chunks)
        return self.f.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks, fillvalue=fill)

    def array(self, key):
        return self.f[key]

    def read_str(self, key, index=slice(None)) -> np.ndarray:
        return np.asarray(self.f[key].asstr()[index], dtype=object)

    def get_attrs(self, key):
        node = self.f if key == "" else self.f[key]
        raw = node.attrs.get("json")
        return json.loads(raw) if raw else {}

    def set_attrs(self, key, attrs):
        node = self.f if key == "" else self.f.require_group(key)
        cur = self.get_attrs(key) if key == "" or key in self.f else {}
        cur.update(attrs)
        node.attrs["json"] = json.dumps(cur)

    def groups(self, key=""):
        import h5py

        node = self.f if key == "" else self.f[key]
        return sorted(k for k, v in node.items() if isinstance(v, h5py.Group))

    def delete(self, key):
        if key in self.f:
            del self.f[key]

    def consolidate(self):
        self.f.flush()

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


def open_store(path: Path, mode: str):
    if is_hdf5(path):
        return _H5Store(path, mode)
    return _ZarrStore(path, mode)


def finish_pending_io(timeout: float = 5.0) -> None:
    """Let the reads and writes that an interrupted call (Ctrl-C) left running on zarr's I/O
    thread end, cancelling those not done within `timeout` seconds. Without this, the interpreter
    closes that loop at exit and asyncio prints "Task was destroyed but it is pending!" for each."""
    import asyncio
    import sys

    sync = sys.modules.get("zarr.core.sync")  # zarr's own loop; absent: no store was ever opened
    loop = sync.loop[0] if sync is not None else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def settle():
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(settle(), loop).result(timeout + 1)
    except Exception:  # noqa: BLE001 - the process is stopping anyway: never a traceback from here
        pass
