"""The output contract, written as one set, and the checks that come before any work.

``<out>/<name>/`` holds tables (``.csv`` + ``.md``), figures (``.png``), ``run.log``, ``provenance.json`` and
``summary.json``. A run writes them into ``<out>/.staging/<name>.<pid>/`` and, only when everything is
written, swaps that folder in (the old set is renamed aside, the new one renamed in, the old one removed).
A killed or failing run therefore leaves the previous complete set. A ``README.md`` that a person wrote
into the old set is carried over. One run at a time writes a given ``<out>/<name>``: a second one is
refused while the first holds ``<out>/.locks/<name>.lock``.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from reference.checkpoint import atomic_write_bytes, atomic_write_text

from .declare import Report
from .util import markdown_table

__all__ = ["MIN_FREE_BYTES", "OutputError", "check_writable", "free_bytes", "lock", "clean_stale", "Staging"]

#: a run refuses to start when a folder it writes to has less free space than this
MIN_FREE_BYTES = 64 * 2**20

KEEP = ("README.md",)  # hand-written notes that a new set carries over


class OutputError(Exception):
    """A folder a run must write to cannot be used; raised before any work."""


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_writable(path: Path, what: str) -> Path:
    """Create ``path`` if needed and prove that it can be written to, with room to spare."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=f".probe.pid{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what} {path} cannot be written: {e.strerror or e}") from None
    free = free_bytes(path)
    if free < MIN_FREE_BYTES:
        raise OutputError(f"{what} {path} has only {free / 2**20:.1f} MiB free (a run needs at least "
                          f"{MIN_FREE_BYTES / 2**20:.0f} MiB)")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_of(name: str) -> int | None:
    """The pid in a temp or staging name ``<stem>.pid<N>[.<rest>]`` written by this package."""
    for part in name.split(".")[1:]:
        if part.startswith("pid") and part[3:].isdigit():
            return int(part[3:])
    return None


def clean_stale(root: Path, log=print) -> None:
    """Remove what killed runs left in ``root``: temp files of atomic writes (``.<name>.pid<N>.*.tmp``) and
    staging folders whose process is gone; restore a set that a killed swap had moved aside."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.rglob(".*.tmp"):
        pid = _pid_of(p.name)
        if pid is None or not _pid_alive(pid):
            with contextlib.suppress(OSError):
                p.unlink()
    for sub in (root / ".staging", root / ".old"):
        if not sub.is_dir():
            continue
        for d in sub.iterdir():
            pid = _pid_of(d.name)
            if pid is not None and _pid_alive(pid) and pid != os.getpid():
                continue
            final = root / d.name.split(".")[0]
            if sub.name == ".old" and not final.exists():
                os.replace(d, final)  # the swap was killed between its two renames: the old set is the set
                log(f"restored {final} from an interrupted swap")
            else:
                shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def lock(root: Path, name: str) -> Iterator[None]:
    d = Path(root) / ".locks"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.lock"
    f = open(path, "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise OutputError(f"another run (pid {holder}) is writing {Path(root) / name}; wait for it to "
                              f"finish or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()


class Staging:
    """A folder the run writes into, swapped in for ``<root>/<name>`` by :meth:`commit`."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = Path(root), name
        self.final = self.root / name
        self.dir = self.root / ".staging" / f"{name}.pid{os.getpid()}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def write_table(self, name: str, rows, columns=None, title: str | None = None) -> None:
        rows = list(rows)
        cols = list(columns or (rows[0].keys() if rows else []))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
        atomic_write_text(buf.getvalue(), self.dir / f"{name}.csv")
        atomic_write_text((f"### {title}\n\n" if title else "") + markdown_table(rows, cols), self.dir / f"{name}.md")

    def save_figure(self, name: str, fig) -> None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(buf.getvalue(), self.dir / f"{name}.png")

    def write_report(self, rep: Report) -> None:
        for kind, names in (("table", [t.name for t in rep.tables]), ("figure", [f.name for f in rep.figures])):
            if len(set(names)) != len(names):  # a table (.csv/.md) and a figure (.png) may share a name
                raise ValueError(f"the report names a {kind} twice: {sorted(names)}")
        for t in rep.tables:
            self.write_table(t.name, t.rows, t.columns, t.title)
        for f in rep.figures:
            self.save_figure(f.name, f.fig)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(text, self.dir / name)

    def commit(self) -> Path:
        for k in KEEP:
            old = self.final / k
            if old.is_file() and not (self.dir / k).exists():
                shutil.copy2(old, self.dir / k)
        if self.final.exists():
            aside = self.root / ".old" / f"{self.name}.pid{os.getpid()}"
            aside.parent.mkdir(exist_ok=True)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(self.final, aside)
            os.replace(self.dir, self.final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(self.dir, self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
