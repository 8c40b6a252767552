"""Writing the archive to disk: atomically, only what changed, and never a private value.

Three guarantees, each for a reader of the public site:

- **Never a leak.** Every file passes `LeakGuard` before it is staged: its bytes (and, for
  text, its HTML-unescaped text) are scanned, lower-cased, for every private value of every
  thread (citizens' addresses, tokens, our thread addresses). Redaction upstream should have
  removed them all; this is the last line of defence, and it raises instead of writing.
- **Never half a site.** Files are staged as temporary files inside the output folder first;
  only when every file of the build has been staged (and checked) are they moved into place,
  each with `os.replace`. A failed build leaves the published site as it was. Every staged
  file is fsynced before it is renamed, and every folder a rename or removal changed is
  fsynced after, so a crash or power cut leaves each file either old or new, never empty.
- **Only what changed.** A manifest (path → sha256) in `.mailflow-cache/manifest.json` says
  what the last build wrote; an unchanged file is not touched (its mtime stays, so HTTP caches
  and rsync stay quiet), and a file the new build no longer produces is removed.

`swap_in` puts a fully built sibling folder in place of the old one (`--full`), with an atomic
exchange where the kernel offers one.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import html
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from mailflow.errors import MailflowError

if TYPE_CHECKING:
    from mailflow.archive.cachedb import CacheDB

CACHE_DIR = ".mailflow-cache"
MANIFEST = "manifest.json"
# Folders the writer never produces nor removes: its own cache, and Pagefind's index.
RESERVED = (CACHE_DIR, "pagefind")
_ALNUM = re.compile(rb"[a-z0-9]+")
# Every byte but [a-z0-9] made a space: the runs of [a-z0-9] are then the words after a
# space, which a pattern with a literal first byte finds at C speed (`LeakGuard._alnum_hit`).
_RUN_BYTES = bytes(b if b in b"abcdefghijklmnopqrstuvwxyz0123456789" else 32
                   for b in range(256))
_TEXT_SUFFIXES = (".html", ".json", ".xml", ".atom", ".txt", ".css", ".js", ".jsonl", ".svg")


class LeakError(MailflowError):
    """A file about to be published contains a private value. Nothing was written."""


class LeakGuard:
    """Finds any of many private values in a file's bytes, at the cost of a few C-speed scans.

    A site with thousands of threads has tens of thousands of private values, and every file
    of every build is checked against all of them; one regular expression of them all took
    seconds to compile (at 10,000 threads) and 2-4 ms per page to run. The values have
    shapes, so the guard looks for them by shape instead, and is exact:

    - values made only of `[a-z0-9]` (the threads' tokens): any occurrence lies inside a run
      of such bytes at least as long as the shortest of them; the few runs that long are
      found with one small regex and every window of each length looked up in a set;
    - values with an `@` (a citizen's address): any occurrence puts its first `@` on an `@`
      of the file; what precedes each `@` of the file is looked up by length;
    - a value that contains one of the first kind (our addresses and their local parts hold
      the thread's token) is found whenever that value is, so it needs no search of its own;
    - anything else (the site's secret, say) goes into one small trie-shaped regex.

    Which label is reported (the first value in the file, the longest there) is worked out by
    a slow exact search, only once something has been found.
    """

    MIN_LENGTH = 5   # shorter "secrets" would match ordinary text; none of ours is that short
    CLEAN_RUNS = 200_000   # clean runs remembered (at most 64 bytes each: ~20 MB)
    CLEAN_RUN_MAX = 64

    def __init__(self, values: Iterable[tuple[str, str]]):
        self.labels: dict[bytes, str] = {}
        for value, label in values:
            v = value.strip().lower().encode("utf-8")
            if len(v) >= self.MIN_LENGTH:
                self.labels.setdefault(v, label)
        words = sorted(self.labels)
        alnum = [w for w in words if _ALNUM.fullmatch(w)]
        by_len: dict[int, set[bytes]] = {}
        for w in alnum:
            by_len.setdefault(len(w), set()).add(w)
        self._by_len: dict[int, frozenset[bytes]] = {
            n: frozenset(found) for n, found in sorted(by_len.items())}
        # The runs of [a-z0-9] at least as long as the shortest such value, in the text with
        # every other byte made a space and a space before it: `[a-z0-9]{n,}` tried a match
        # at every letter of the file, three times slower.
        self._runs = (re.compile(rb" ([^ ]{%d,})" % min(self._by_len))
                      if self._by_len else None)
        # Runs already looked through and found clean: the same words, class names and
        # digests recur in every page of a site, and a run is clean or not for good.
        self._clean: set[bytes] = set()
        # length of the part before the first "@" -> that part -> the values
        self._at: dict[int, dict[bytes, list[bytes]]] = {}
        other: list[bytes] = []
        for w in words:
            if w in self._by_len.get(len(w), ()) or self._alnum_hit(w):
                continue
            i = w.find(b"@")
            if i >= 0:
                self._at.setdefault(i, {}).setdefault(w[:i], []).append(w)
            else:
                other.append(w)
        self._re = re.compile(_trie_pattern(other)) if other else None

    def _alnum_hit(self, data: bytes) -> bool:
        if self._runs is None:
            return False
        by_len = self._by_len
        clean = self._clean
        for run in self._runs.findall(b" " + data.translate(_RUN_BYTES)):
            if run in clean:
                continue
            n = len(run)
            for size, found in by_len.items():
                if size > n:
                    break
                if size == n:
                    if run in found:
                        return True
                    continue
                for i in range(n - size + 1):
                    if run[i:i + size] in found:
                        return True
            if n <= self.CLEAN_RUN_MAX and len(clean) < self.CLEAN_RUNS:
                clean.add(run)
        return False

    def _at_hit(self, data: bytes) -> bool:
        if not self._at:
            return False
        p = data.find(b"@")
        while p >= 0:
            for size, prefixes in self._at.items():
                if size <= p:
                    for w in prefixes.get(data[p - size:p], ()):
                        if data.startswith(w, p - size):
                            return True
            p = data.find(b"@", p + 1)
        return False

    def find(self, data: bytes) -> str | None:
        """The label of a private value found in `data`, or None."""
        if not self.labels:
            return None
        data = data.lower()
        if not (self._alnum_hit(data) or self._at_hit(data)
                or (self._re is not None and self._re.search(data))):
            return None
        # Something is there: name the first value in the file (the longest at that place).
        best: tuple[int, int, bytes] | None = None
        for w in self.labels:
            i = data.find(w)
            if i >= 0 and (best is None or (i, -len(w)) < best[:2]):
                best = (i, -len(w), w)
        return self.labels[best[2]] if best is not None else "a private value"

    def check(self, rel: str, data: bytes) -> None:
        if rel.endswith(_TEXT_SUFFIXES):
            # Scan the text as a reader gets it: an address written with &#64; or &#39; in
            # HTML is still the address (no secret contains an entity, so one pass will do).
            data = html.unescape(data.decode("utf-8", "replace")).encode("utf-8")
        found = self.find(data)
        if found is not None:
            raise LeakError(f"refusing to publish {rel}: it contains {found} (a private value "
                            "that redaction should have removed); nothing was written")


def _trie_pattern(words: list[bytes]) -> bytes:
    """A regex matching exactly `words`, as a trie: b"ab(?:c|d)" for [b"abc", b"abd"]."""
    trie: dict = {}
    for w in words:
        node = trie
        for byte in w:
            node = node.setdefault(byte, {})
        node[None] = True

    def emit(node: dict) -> bytes:
        end = None in node
        branches = [re.escape(bytes([b])) + emit(child)
                    for b, child in sorted((k, v) for k, v in node.items() if k is not None)]
        if not branches:
            return b""
        body = branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"
        if end:
            # A shorter word ends here: prefer the longer match, else stop.
            return b"(?:" + body + b")?"
        return body

    return emit(trie)


_BAD_PATH_CHARS = re.compile(r"[\x00-\x1f\x7f\\:*?\"<>|]")
_MAX_NAME = 255    # bytes in one path component (ext4, most file systems)
# Paths of plain ASCII names, none starting with a dot, none empty or too long: what the
# builder writes tens of thousands of times, accepted as they are without pathlib.
_PLAIN_REL = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}"
                        r"(?:/[A-Za-z0-9_-][A-Za-z0-9._-]{0,254})*")


def safe_rel(rel: str) -> str:
    """A path inside the output folder, or ValueError: no absolute paths, no '..', no dot
    folders (the cache), nothing in the reserved folders, no control characters,
    backslashes or characters Windows and web servers treat specially, no name too long for
    a file system."""
    if _PLAIN_REL.fullmatch(rel) and rel.partition("/")[0] not in RESERVED:
        return rel      # what `_safe_rel` answers for it (tests/adversarial/test_archive_paths)
    return _safe_rel(rel)


def _safe_rel(rel: str) -> str:
    p = PurePosixPath(rel)
    if (p.is_absolute() or not p.parts or _BAD_PATH_CHARS.search(rel)
            or any(part in ("", ".", "..") or part.startswith(".")
                   or len(part.encode("utf-8", "surrogatepass")) > _MAX_NAME
                   for part in p.parts)):
        raise ValueError(f"not a publishable path: {rel!r}")
    if p.parts[0] in RESERVED:
        raise ValueError(f"{rel!r} is in a folder the writer does not own")
    return str(p)


@dataclass
class WriteResult:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept_whole: int = 0     # files kept by owner (`Writer.keep_owner`), not listed


# From this many files on, one syncfs() of the file system replaces an fsync per file: a full
# build writes tens of thousands, and waiting for each fsync in turn was most of its time.
SYNCFS_MIN = 64


class Writer:
    """Stages every file of one build, then commits them all; see the module docstring.

    `fresh`: `root` is a new folder nobody reads yet (a full build's, swapped in whole
    afterwards): files are written in place, with no staging and no renames, and made
    durable together at `commit`.

    `index`: the build's `CacheDB`, which then holds the manifest (read a row at a time,
    written for the files of this build only); without it, `manifest.json` is read and
    written whole. Each file has an owner (`owner`, set by the builder: a thread's key, or
    "" for the site-wide files); `keep_owner` keeps every file of an owner as it is without
    looking at them, and a file is removed when its owner produced files this build but not
    that one, or produced nothing and was not kept (a thread gone from the archive).
    """

    def __init__(self, root: Path, guard: LeakGuard, *, fresh: bool = False,
                 index: CacheDB | None = None):
        self.root = Path(root)
        self.guard = guard
        self.fresh = fresh
        self.index = index
        self._root = str(self.root)
        self._direct: list[Path] = []
        self._dirs: set[Path] = set()
        self.cache = self.root / CACHE_DIR
        self.previous = load_manifest(self.root) if index is None else {}
        self.manifest: dict[str, str] = {}
        self.owner = ""
        self.owners: dict[str, str] = {}       # rel -> owner, of the files of this build
        self.kept_owners: set[str] = set()
        # The owners of files in the manifest, when the builder knows them (the last build's
        # `owners_now`: every owner it kept or produced, the others' files were removed):
        # else `commit` reads them from the index.
        self.known_owners: set[str] | None = None
        self.owners_now: set[str] | None = None
        self._staged: list[tuple[Path, Path]] = []
        self._staging = self.cache / "staging"
        self.result = WriteResult()
        self.kept: list[str] = []
        self._kept_content: list[tuple[str, bytes]] = []

    def _prev(self, rel: str) -> str | None:
        if self.index is None:
            return self.previous.get(rel)
        return None if self.fresh else self.index.digest(rel)

    def has(self, rel: str, digest: str) -> bool:
        """Whether the published file `rel` is exactly `digest` (per the last manifest)."""
        return self._prev(rel) == digest and os.path.isfile(os.path.join(self._root, rel))

    def on_disk(self, rel: str) -> bool:
        """Whether `rel` is a file in the output (`has` without the manifest's digest, for a
        caller that knows it)."""
        return os.path.isfile(os.path.join(self._root, rel))

    def keep_owner(self, owner: str) -> None:
        """Keep every file of `owner` (a thread whose view and pages did not change) as the
        last build left it, without reading the manifest or the disk: an incremental build
        after one message then costs the same on a site of any size. (A file deleted by
        hand from the output is restored by the next build of its thread, or `--full`.)"""
        if self.index is None:
            raise ValueError("keep_owner needs the cache index")
        self.kept_owners.add(owner)

    def keep_owners(self, owners: Iterable[str]) -> None:
        """`keep_owner` for each of `owners`, at once."""
        if self.index is None:
            raise ValueError("keep_owner needs the cache index")
        self.kept_owners.update(owners)

    def keep(self, rel: str, digest: str, *, checked: bool = False) -> None:
        """Keep a file this build knows to be unchanged without producing it again (the
        attachments of a thread whose inputs did not change: see build.ThreadCache).
        `checked`: the caller has just asked `has(rel, digest)`."""
        rel = safe_rel(rel)
        if rel in self.manifest:
            raise ValueError(f"{rel} was already written in this build")
        if not checked and not self.has(rel, digest):
            raise ValueError(f"{rel} is not on disk as it was")
        self.manifest[rel] = digest
        self.owners[rel] = self.owner
        self.result.unchanged.append(rel)
        self.kept.append(rel)

    def check_kept(self, guard: LeakGuard) -> None:
        """Check the files kept without being produced (`keep`) against `guard`, reading
        them from disk; raises LeakError like `write`. The builder calls it with the private
        values added since the kept files were checked."""
        if not guard.labels:
            return
        kept = list(self.kept)
        if self.index is not None and self.kept_owners:
            kept += self.index.rels_of(self.kept_owners)
        for rel in kept:
            guard.check(rel, (self.root / rel).read_bytes())
        for rel, data in self._kept_content:
            guard.check(rel, data)

    def kept_content(self, rel: str, data: bytes) -> None:
        """Part of a file written now that an earlier build wrote and checked as it is (the
        unchanged threads' lines of the data dump): `write` is given the rest to check, and
        `check_kept` checks this against the values added since, like the kept files."""
        self._kept_content.append((rel, data))

    def write(self, rel: str, data: bytes | str, *, scan: bytes | None = None) -> str:
        """Check and stage one file; returns its sha256. `scan`: what to check instead of
        `data` (the uncompressed text of a .gz). Writing the same path twice is a bug."""
        return self.put_checked(*self.checked(rel, data, scan=scan))

    def checked(self, rel: str, data: bytes | str, *, scan: bytes | None = None
                ) -> tuple[str, bytes, str]:
        """What `write` does to a file before recording it, which depends on nothing but the
        file and the guard: (the path made safe, the bytes, their sha256) once the leak
        check passed (else LeakError). A view worker does it for its thread's files
        (`ahead`), so that the build's own process does not."""
        rel = safe_rel(rel)
        raw = data.encode("utf-8") if isinstance(data, str) else data
        self.guard.check(rel, raw if scan is None else scan)
        return rel, raw, hashlib.sha256(raw).hexdigest()

    def ahead(self, rel: str, data: bytes | str) -> tuple[str, bytes | None, str]:
        """In a view worker (a fork of the build's process: this writer's copy, with the
        build's guard): `checked`, and in a fresh folder the file written in place as well,
        handing back no bytes (None). The build's process records it with `put_checked`;
        a build that fails removes the fresh folder whole."""
        rel, raw, digest = self.checked(rel, data)
        if not self.fresh:
            return rel, raw, digest
        self._write_in_place(self.root / rel, raw)
        return rel, None, digest

    def put_checked(self, rel: str, raw: bytes | None, digest: str) -> str:
        """Record and stage a file that `checked` or `ahead` of this build's writer passed
        (their answer as it is); `raw` None: `ahead` wrote it in place. Returns the digest."""
        if rel in self.manifest:
            raise ValueError(f"{rel} was already written in this build")
        self.manifest[rel] = digest
        self.owners[rel] = self.owner
        target = self.root / rel
        if raw is None:
            if not self.fresh:
                raise ValueError(f"{rel}: written ahead, but this build stages its files")
            self._direct.append(target)
            self.result.written.append(rel)
            return digest
        if self._prev(rel) == digest and target.is_file():
            self.result.unchanged.append(rel)
            return digest
        if self.fresh:
            self._write_in_place(target, raw)
            self._direct.append(target)
            self.result.written.append(rel)
            return digest
        if not self._staged:
            self._staging.mkdir(parents=True, exist_ok=True)
        tmp = self._staging / f"{len(self._staged):07d}.tmp"
        with open(tmp, "wb") as f:   # made durable at commit, before it is renamed
            f.write(raw)
        self._staged.append((tmp, target))
        self.result.written.append(rel)
        return digest

    def _write_in_place(self, target: Path, raw: bytes) -> None:
        if target.parent not in self._dirs:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(target.parent)
        with open(target, "wb") as f:
            f.write(raw)

    def abort(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staged.clear()

    def commit(self) -> WriteResult:
        """Move every staged file into place, remove what is no longer produced, save the
        manifest. Only called once every file of the build has been checked."""
        changed: set[Path] = set()
        if self.fresh:
            # Nobody reads this folder until it is swapped in: one flush of it all.
            sync_files(self._direct, self.root, force_syncfs=True)
            self._direct.clear()
        sync_files([tmp for tmp, _ in self._staged], self.root)
        for tmp, target in self._staged:
            _makedirs(target.parent, self.root, changed)
            os.replace(tmp, target)
            changed.add(target.parent)
        self._staged.clear()
        shutil.rmtree(self._staging, ignore_errors=True)
        if self.index is not None:
            # Only the owners that produced files now, or vanished, can have lost some.
            produced = set(self.owners.values()) | {""}
            before = self.index.owners() if self.known_owners is None else self.known_owners
            gone = before - produced - self.kept_owners
            self.owners_now = produced | self.kept_owners
            previous = set(self.index.rels_of(produced | gone))
        else:
            previous = set(self.previous)
        removed: list[str] = []
        for rel in sorted(previous - set(self.manifest)):
            try:
                safe_rel(rel)
            except ValueError:
                continue   # a manifest edited by hand never makes us delete outside our files
            path = self.root / rel
            if path.is_file():
                path.unlink()
                changed.add(path.parent)
            self.result.removed.append(rel)
            removed.append(rel)
            _prune_empty(path.parent, self.root, changed)
        for folder in sorted(changed, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)   # deepest first: a folder's entry in its parent comes after
        if self.index is None:
            save_manifest(self.root, self.manifest)
            return self.result
        own = not self.index.in_transaction
        self.index.begin()
        self.index.delete_files(removed)
        # A kept file's row stands as the last build wrote it (the same digest, the same
        # owner): only the files produced now are written (about 330 rows a build fewer at
        # 10,000 threads: the listing pages kept).
        kept = set(self.kept)
        self.index.put_files((rel, digest, self.owners[rel])
                             for rel, digest in self.manifest.items() if rel not in kept)
        if own:
            self.index.commit()
        self.result.kept_whole = self.index.manifest_size() - len(self.manifest)
        return self.result


def load_manifest(root: Path) -> dict[str, str]:
    """path -> sha256 of every file the last build left in `root` (from its cache index,
    or the older `manifest.json`)."""
    index_path = root / CACHE_DIR / "cache.sqlite"
    if index_path.exists():
        from mailflow.archive.cachedb import CacheDB
        index = CacheDB(index_path)
        try:
            files = index.manifest()
        finally:
            index.close()
        if files:
            return files
    try:
        data = json.loads((root / CACHE_DIR / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def save_manifest(root: Path, manifest: dict[str, str]) -> None:
    write_private_json(root / CACHE_DIR / MANIFEST, {"version": 1, "files": dict(sorted(manifest.items()))})


def write_private_json(path: Path, data: object) -> None:
    """A cache file, written atomically and durably (never published: it lives in the cache
    folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, separators=(",", ":"), sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _syncfs(root: Path) -> bool:
    """syncfs(2) of the file system holding `root`; False where it is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        return fn(fd) == 0
    finally:
        os.close(fd)


def sync_files(paths: list[Path], root: Path, force_syncfs: bool = False) -> None:
    """Make the content of these files (and, with syncfs, every entry of the file system)
    durable: an fsync each for a few, one syncfs for many (or when asked)."""
    if not paths and not force_syncfs:
        return
    if (force_syncfs or len(paths) >= SYNCFS_MIN) and _syncfs(root):
        return
    if force_syncfs and not paths:
        os.sync()
        return
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if force_syncfs:
        os.sync()   # the folders too, where syncfs is missing


def fsync_dir(folder: Path) -> None:
    """Make the entries of a folder (a rename, a new or removed file) durable."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        return      # pruned after it changed: its parent records that
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(folder: Path, root: Path, changed: set[Path]) -> None:
    """mkdir -p, noting each parent that gained a folder (to fsync it)."""
    missing = []
    while not folder.is_dir() and folder != root and root in folder.parents:
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir(exist_ok=True)
        changed.add(f.parent)


def _prune_empty(folder: Path, root: Path, changed: set[Path] | None = None) -> None:
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        if changed is not None:
            changed.add(folder.parent)
        folder = folder.parent


# -- swapping a full rebuild in -------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


_removing: dict[Path, threading.Thread] = {}
_removals_lock = threading.Lock()


def remove_later(path: Path, out: Path) -> None:
    """Delete a folder nobody reads any more (the site a full rebuild replaced) in a thread
    of this process: removing tens of thousands of files took longer than building them.
    The folder is first renamed to `.<out>.old-…` beside `out`; the thread is not a daemon,
    so the process finishes it before it exits (`sweep_removed` catches up after a crash)."""
    trash = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    os.replace(path, trash)
    t = threading.Thread(target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True},
                         name="archive-remove")
    with _removals_lock:
        for p, x in list(_removing.items()):
            if not x.is_alive():
                del _removing[p]
        _removing[trash] = t
    t.start()


def wait_for_removals() -> None:
    """Wait until the folders handed to `remove_later` are gone."""
    with _removals_lock:
        pending = list(_removing.values())
    for t in pending:
        t.join()


def sweep_removed(out: Path) -> None:
    """Remove what an earlier process left of `remove_later`'s folders beside `out`."""
    for p in out.parent.glob(f".{out.name}.old-*"):
        with _removals_lock:
            busy = p in _removing and _removing[p].is_alive()
        if p.is_dir() and not busy:
            remove_later(p, out)


def swap_in(new: Path, out: Path) -> None:
    """Make the fully built folder `new` the published `out`; the old one is deleted (in
    the background: `remove_later`).

    With RENAME_EXCHANGE a reader sees either the old site or the new one, never a gap;
    elsewhere two renames leave `out` missing for an instant, but never half-built.
    """
    if not out.exists():
        os.replace(new, out)
        fsync_dir(out.parent)
        return
    if _exchange(new, out):
        fsync_dir(out.parent)
        remove_later(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    fsync_dir(out.parent)
    remove_later(old, out)
