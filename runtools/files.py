"""Files that are never half-written: every file the project writes goes through `atomic_write` (a temp file beside
the target, then one rename), so a crash, a full disk or a Ctrl-C leaves either the old file or the new one."""
import json
import os
import tempfile
from pathlib import Path


def file_mode() -> int:
    """The mode a new file gets from open(): 0666 minus the process umask (mkstemp's temp files are 0600)."""
    try:  # Linux: read it without changing it (other threads may be creating files)
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path, write) -> Path:
    """Call write(f) with a binary file object on a temp file beside `path` (folders are created), then move it into
    place with os.replace. The file gets the mode open() would give it; no temp file survives a failure, and the file
    at `path` before is untouched unless the write succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # closed on an error too, so a failed write frees its space at once
            os.fchmod(f.fileno(), file_mode())
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(text: str, path) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(obj, path, allow_nan: bool = True) -> Path:
    return write_text(json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n", path)


def save_png(array, path) -> Path:
    """A uint8 (H, W) or (H, W, 3) numpy array as PNG."""
    import numpy as np
    from PIL import Image
    return atomic_write(path, lambda f: Image.fromarray(np.ascontiguousarray(array)).save(f, format="PNG"))
