"""This machine's tuning table: measured values that "auto" uses in place of the dispatcher's defaults.

`leetdecoding tune` measures them and writes the table to $LEETDECODING_TUNING, or by default to
~/.cache/leetdecoding/tuning.json ($XDG_CACHE_HOME honoured). LEETDECODING_TUNING=off ignores every table.

One entry per device (the CPU model and torch's thread count, or the GPU's name and compute capability) and
dtype, with any of:

    vanilla_max_n       the longest N at which the quadratic form beats chunked (0: never)
    chunk_size_small    chunked's chunk for head dims <= 64
    chunk_size_large    chunked's chunk for larger head dims
    triton_chunk_size   triton_chunked's chunk

A value missing from the entry keeps its default. A table that cannot be read is ignored with one warning.
The dispatcher looks the table up on every call: the file is checked for changes at most once a second.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import time
import warnings
from pathlib import Path

import torch

from .device import cpu_model
from .inputs import dtype_name

ENV = "LEETDECODING_TUNING"
VERSION = 1
# the values a table may set, each with the values it may take
ALLOWED = {
    "vanilla_max_n": range(0, 1 << 20),
    "chunk_size_small": (16, 32, 64, 128, 256),
    "chunk_size_large": (16, 32, 64, 128, 256),
    "triton_chunk_size": (16, 32, 64, 128),
}

_loaded: dict[str, tuple[tuple, dict]] = {}  # path -> ((modification time, size), entries)
_checked: dict[str, float] = {}  # path -> time.monotonic() of its last check for changes
_warned: set[tuple] = set()  # (path, modification time, size) of tables already warned about
RECHECK_S = 1.0


def forget() -> None:
    """Drop what was read: the next lookup reads the table again (one edited by hand is otherwise picked up
    within RECHECK_S)."""
    _loaded.clear()
    _checked.clear()


def table_path() -> Path | None:
    """Where the table is read and written; None when LEETDECODING_TUNING=off."""
    return _path(os.environ.get(ENV, ""), os.environ.get("XDG_CACHE_HOME", ""))


@functools.lru_cache(maxsize=8)
def _path(env: str, xdg: str) -> Path | None:
    env = env.strip()
    if env.lower() in ("off", "0", "none"):
        return None
    if env:
        return Path(env).expanduser()
    cache = xdg or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "leetdecoding" / "tuning.json"


@functools.cache
def _device_key(kind: str, index: int | None, threads: int) -> str:
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda {torch.cuda.get_device_name(index)} sm_{major}{minor}"
    return f"{kind} {cpu_model()}, {threads} threads"


def device_key(device: torch.device | str) -> str:
    """The table's name for this device as torch uses it now (a CPU entry depends on the thread count)."""
    device = torch.device(device)
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    return _device_key(device.type, index, torch.get_num_threads())


def dtype_key(dtype: torch.dtype) -> str:
    return dtype_name(dtype)


def _read(path: Path) -> dict:
    """The entries of the table at `path` ({} if there is none), cached until the file changes."""
    key = str(path)
    cached = _loaded.get(key)
    now = time.monotonic()
    if cached is not None and now - _checked.get(key, -RECHECK_S) < RECHECK_S:
        return cached[1]
    _checked[key] = now
    try:
        stat = path.stat()
    except OSError:
        _loaded[key] = ((), {})
        return {}
    version = (stat.st_mtime_ns, stat.st_size)
    if cached is not None and cached[0] == version:
        return cached[1]
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
        entries = {d: {t: check_values(v) for t, v in by_dtype.items()} for d, by_dtype in data["entries"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if (str(path), *version) not in _warned:  # once per version of the file
            _warned.add((str(path), *version))
            warnings.warn(
                f"leetdecoding: ignoring the tuning table {path} ({type(e).__name__}: {e}); the defaults apply. "
                f"Run `leetdecoding tune` to rewrite it, or set {ENV}=off.",
                stacklevel=3,
            )
        entries = {}
    _loaded[key] = (version, entries)
    return entries


def check_values(values: dict) -> dict:
    """The entry's values, checked: ValueError naming the first value that is not allowed."""
    if not isinstance(values, dict):
        raise TypeError(f"an entry must be an object; got {type(values).__name__}")
    for name, value in values.items():
        if name in ("measured", "command"):
            continue
        if name not in ALLOWED:
            raise ValueError(f"unknown value {name!r}; known: {', '.join(ALLOWED)}")
        if not isinstance(value, int) or isinstance(value, bool) or value not in ALLOWED[name]:
            raise ValueError(f"{name} must be an int in {ALLOWED[name]}; got {value!r}")
    return values


def lookup(device: torch.device | str, dtype: torch.dtype) -> tuple[dict, Path | None]:
    """(the tuned values for this device and dtype, the table they come from); ({}, None) when none apply,
    and while torch.compile traces a call (a graph does not read files: compiled code keeps the defaults)."""
    if torch.compiler.is_compiling():
        return {}, None
    path = table_path()
    if path is None:
        return {}, None
    entry = _read(path).get(device_key(device), {}).get(dtype_key(dtype))
    return (entry, path) if entry else ({}, None)


def save(device: torch.device | str, dtype: torch.dtype, values: dict, path: Path | None = None) -> Path:
    """Write `values` as this device's and dtype's entry (other entries kept); returns the path written."""
    path = path or table_path()
    if path is None:
        raise ValueError(f"{ENV}=off: there is no tuning table to write; pass a path or unset {ENV}.")
    check_values(values)
    forget()  # read what is on disk now
    entries = dict(_read(path)) if path.exists() else {}
    entry = dict(values, measured=datetime.datetime.now().isoformat(timespec="seconds"))
    entries.setdefault(device_key(device), {})[dtype_key(dtype)] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": VERSION, "entries": entries}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    forget()
    return path


__all__ = ["ALLOWED", "ENV", "check_values", "device_key", "dtype_key", "forget", "lookup", "save", "table_path"]
