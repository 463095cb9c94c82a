"""Outputs that never destroy what the user owns: every writer of a folder or a file goes through here.

A new output is written under a hidden temporary sibling name and published by rename only when it is
complete. An existing target is replaced only with `--overwrite`, and only when it holds nothing but a
previous output of the same kind (recognised by its files); the current directory, a folder holding the
inputs, and any folder with other files are refused, naming them. The old output is moved aside and
removed only after the new one is in place, so a crash leaves one of the two. Temporaries left by a
crashed run are recognised by name (they carry the writer's process id) and removed by the next run
that writes there. Temporaries are created new (O_CREAT|O_EXCL|O_NOFOLLOW for files, mkdir with mode 0700
for folders), so nothing planted under their names in a shared folder, a symlink above all, is followed
or written through. Write failures (disk full, read-only folder) become one line naming the path.
`user_path` expands `~` in every path option.

Standard library only: `preprocess --help` imports this without torch.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from mistral_lightning.errors import UserError

# Temporary names, each carrying the pid of the process that made it: `.<name>.partial-<pid>-<hex>` is a
# folder being written, `.<name>.old-<pid>-<hex>` a previous output moved aside, `<name>.tmp-<pid>-<hex>` a
# file (`<name>.tmp-<pid>` from earlier versions is recognised too).
_PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>\d+)-[0-9a-f]+")
_OLD = re.compile(r"\.(?P<name>.+)\.old-(?P<pid>\d+)-[0-9a-f]+")
_TMP_FILE = re.compile(r"(?P<name>.+)\.tmp-(?P<pid>\d+)(?:-[0-9a-f]+)?")
# A new file only: never an existing one, never through a symlink; the mode then gets the user's umask.
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FOREIGN_SHOWN = 3  # foreign files named in a refusal
_NEARLY_FULL_BYTES = 16 * 1024**2  # below this much free space, an unexplained write failure is a full disk


class OutputError(UserError):
    """An output cannot be written where the user asked, or writing it failed; says what to do."""


def user_path(value: str | os.PathLike) -> str:
    """A path as the user typed it, with `~` and `~user` expanded as a shell would (quoted or after `=`,
    the shell leaves them): the `type` of every path option, and what every output target goes through."""
    return os.path.expanduser(os.fspath(value))


@dataclass(frozen=True)
class FolderKind:
    """What a previous output folder of one kind holds, recognised by its files.

    `patterns` match relative paths part by part (`iter_*/mp_rank_*/model_optim_rng.pt`); `required`
    is a file every such output has, so a folder of only, say, tokenizer files is not mistaken for one.
    """

    description: str
    patterns: tuple[str, ...]
    required: str

    def _matches(self, relative: str) -> bool:
        parts = relative.split("/")
        return any(
            len(pattern.split("/")) == len(parts)
            and all(fnmatchcase(part, p) for part, p in zip(parts, pattern.split("/")))
            for pattern in self.patterns
        )

    def foreign_files(self, folder: Path, limit: int = _FOREIGN_SHOWN + 1) -> list[str]:
        """Up to `limit` entries of `folder` that are not part of this kind of output (links always are)."""
        foreign: list[str] = []
        for root, dirs, files in os.walk(folder):
            base = Path(root).relative_to(folder)
            for name in sorted(files) + [d for d in sorted(dirs) if (Path(root) / d).is_symlink()]:
                relative = (base / name).as_posix()
                if (Path(root) / name).is_symlink() or not self._matches(relative):
                    foreign.append(relative)
                    if len(foreign) >= limit:
                        return foreign
            dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
        return foreign


@dataclass(frozen=True)
class FileKind:
    """What a previous output file of one kind looks like, recognised by its first bytes."""

    description: str
    recognise: Callable[[bytes], bool]  # called with the file's first 4 KiB


@dataclass
class OutputTarget:
    """Where the user asked an output to go, and under which option names, for the messages."""

    path: Path
    option: str = "--save-dir"
    overwrite: bool = False
    overwrite_option: str = "--overwrite"
    # What must never be replaced, by description: the inputs, the model.pretrained folder, ...
    protected: Mapping[str, Path | str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(user_path(self.path))

    def named(self) -> str:
        return f"{self.option} {self.path}"


def as_target(target: OutputTarget | str | os.PathLike, *, overwrite: bool = False) -> OutputTarget:
    return target if isinstance(target, OutputTarget) else OutputTarget(Path(target), overwrite=overwrite)


# ---------------------------------------------------------------------------------------------- checks
def _refuse_protected(target: OutputTarget) -> None:
    """The current directory, the inputs, and any folder holding one of them are never an output."""
    out = target.path.resolve()
    protected = {"the current directory": Path.cwd(), **target.protected}
    for what, path in protected.items():
        if path is None or str(path) == "":
            continue
        resolved = Path(path).resolve()
        if out == resolved or out in resolved.parents:
            relation = "is" if out == resolved else "holds"
            raise OutputError(
                f"{target.named()}: refusing to write there: it {relation} {what} ({path}), whose files would "
                "be replaced; choose a new folder for the output"
            )


def _foreign_message(target: OutputTarget, kind_description: str, foreign: list[str]) -> str:
    shown = ", ".join(foreign[:_FOREIGN_SHOWN]) + (" and more" if len(foreign) > _FOREIGN_SHOWN else "")
    return (
        f"{target.named()}: holds files that are not part of {kind_description} ({shown}); refusing to "
        f"replace it even with {target.overwrite_option}; choose a new folder or move those files away"
    )


def check_output_folder(target: OutputTarget, kind: FolderKind) -> None:
    """Refuse a target that writing `kind` there could destroy something of the user's; see the module doc.
    Temporaries that dead writers left beside it go first (a previous output a crash left aside returns)."""
    _refuse_protected(target)
    out = target.path
    with write_errors(out, target):
        remove_leftovers(out.parent, out.name)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(
            f"{target.named()}: exists and is not a folder; choose a folder path for the output"
        )
    if not out.exists() or not any(out.iterdir()):
        return
    if not target.overwrite:
        raise OutputError(
            f"{target.named()}: exists and is not empty; choose a new folder, or pass {target.overwrite_option} "
            f"to replace a previous {kind.description} there"
        )
    foreign = kind.foreign_files(out)
    if foreign:
        raise OutputError(_foreign_message(target, kind.description, foreign))
    if not (out / kind.required).is_file():
        raise OutputError(
            f"{target.named()}: has no {kind.required}, so it is not a previous {kind.description}; refusing to "
            f"replace it even with {target.overwrite_option}; choose a new folder"
        )


def _first_bytes(path: Path) -> bytes:
    with path.open("rb") as stream:
        return stream.read(4096)


def check_output_file(target: OutputTarget, kind: FileKind) -> None:
    """The file counterpart of check_output_folder: an existing file is replaced only if it is a previous
    output of `kind` and `--overwrite` is given; then the folder is probed for writing."""
    _refuse_protected(target)
    path = target.path
    with write_errors(path, target):
        remove_leftovers(path.parent, path.name)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputError(
            f"{target.named()}: exists and is not a plain file; choose a file path for the output"
        )
    if path.exists() and path.stat().st_size > 0:  # an empty file has nothing to lose
        if not target.overwrite:
            raise OutputError(
                f"{target.named()}: exists; choose another file, or pass {target.overwrite_option} to replace "
                f"a previous {kind.description}"
            )
        if not kind.recognise(_first_bytes(path)):
            raise OutputError(
                f"{target.named()}: is not a previous {kind.description}; refusing to replace it even with "
                f"{target.overwrite_option}; choose another file"
            )
    probe_writable(path.parent, target)


def probe_writable(folder: Path, target: OutputTarget) -> None:
    """Find out now, before hours of work, that the output's folder cannot be written."""
    with write_errors(target.path, target):
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{target.path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        os.mkdir(probe)
        os.rmdir(probe)


# ---------------------------------------------------------------------------------------------- errors
def _os_errno(err: BaseException) -> int | None:
    """The errno behind a write failure, also when a library wraps it (torch, safetensors)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        # safetensors reports I/O errors as text: "I/O error: No space left on device (os error 28)"
        match = re.search(r"\(os error (\d+)\)", str(err))
        if match:
            return int(match.group(1))
        err = err.__cause__ or err.__context__
    return None


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def describe_write_error(err: BaseException, path: Path, target: OutputTarget | None = None) -> str | None:
    """One line for a failed write of `path`: disk full, read-only or unwritable folder, or another OS
    error; None when `err` is not a write failure (then it is a bug and keeps its traceback)."""
    code = _os_errno(err)
    where = target.named() if target is not None else str(path)
    other = f"pass another {target.option}" if target is not None else "choose another place"
    if code is None and isinstance(err, RuntimeError):
        # torch.save to a path reports a full disk only as "unexpected pos"; the free space tells.
        free = _free_bytes(path)
        code = errno.ENOSPC if free is not None and free < _NEARLY_FULL_BYTES else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{where}: no space left on the device while writing {path}; nothing was written under the final "
            f"name; free some space or {other} on a disk with room"
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "read-only file system" if code == errno.EROFS else "permission denied"
        return f"{where}: cannot write {path} ({reason}); {other} in a folder you can write to"
    if code is not None:
        return f"{where}: writing {path} failed ({os.strerror(code)}); {other}"
    return None


class write_errors:  # noqa: N801 (used as a `with` statement, like contextlib's)
    """Turns a write failure inside the block into one OutputError line; other errors pass unchanged."""

    def __init__(self, path: Path, target: OutputTarget | None = None) -> None:
        self.path, self.target = path, target

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, UserError) or not isinstance(exc, Exception):
            return False
        message = describe_write_error(exc, self.path, self.target)
        if message is None:
            return False
        raise OutputError(message) from exc


# ---------------------------------------------------------------------------------------------- leftovers
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(folder: Path, name: str) -> Iterator[tuple[str, Path]]:
    """('partial' | 'old' | 'tmp', path) for each temporary of a dead writer of `name` in `folder`."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        for kind, pattern in (("partial", _PARTIAL), ("old", _OLD), ("tmp", _TMP_FILE)):
            match = pattern.fullmatch(entry.name)
            if match and match.group("name") == name and not _pid_alive(int(match.group("pid"))):
                yield kind, entry


def remove_leftovers(folder: Path, name: str) -> list[Path]:
    """Remove what crashed runs left in `folder` while writing `name`; returns what went.

    A previous output that a crash left moved aside, with nothing under its name, is put back instead.
    """
    removed = []
    final = folder / name
    for kind, leftover in list(_leftovers(folder, name)):
        # Only a real folder or file of ours comes back; a link planted under an "old" name just goes.
        if kind == "old" and not leftover.is_symlink() and not final.exists() and not final.is_symlink():
            os.rename(leftover, final)
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
        removed.append(leftover)
    return removed


def remove_all_leftovers(folder: Path) -> None:
    """What dead writers of any output left in `folder`; one that cannot go now is left for the next run."""
    names = {
        match.group("name")
        for entry in folder.iterdir()
        for match in (_PARTIAL.fullmatch(entry.name), _OLD.fullmatch(entry.name))
        if match
    }
    for name in names:
        try:
            remove_leftovers(folder, name)
        except OSError:
            pass  # a leftover costs space, not correctness


# ---------------------------------------------------------------------------------------------- writing
def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _settle(folder: Path) -> None:
    """Give every file the user's umask modes (some writers create 0600 files) and flush it to disk."""
    mask = _umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            file = Path(root) / name
            os.chmod(file, 0o666 & ~mask)
            with file.open("rb") as stream:
                os.fsync(stream.fileno())


def temporary_sibling(path: Path, role: str) -> Path:
    """`.<name>.<role>-<pid>-<hex>` beside `path`: the name `remove_leftovers` recognises once its writer is dead."""
    return path.parent / f".{path.name}.{role}-{os.getpid()}-{secrets.token_hex(4)}"


class OutputFolder:
    """`with OutputFolder(target, kind) as tmp:` write into `tmp`; on success it becomes `target.path`.

    The target is checked when this is made (so a long job can fail before it starts) and again just
    before publishing. On an error the temporary folder is removed and the target is left as it was.
    """

    def __init__(self, target: OutputTarget, kind: FolderKind) -> None:
        self.target, self.kind = target, kind
        self.path = target.path
        check_output_folder(target, kind)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        with write_errors(self.path, self.target):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = temporary_sibling(self.path, "partial")
            os.mkdir(self.tmp, 0o700)  # nobody else can plant links in it; _settle gives it the umask's modes
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            try:
                with write_errors(self.path, self.target):
                    _settle(self.tmp)
                check_output_folder(self.target, self.kind)
                with write_errors(self.path, self.target):
                    publish(self.tmp, self.path)
                return False
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, UserError):
            message = describe_write_error(exc, self.path, self.target)
            if message is not None:
                raise OutputError(message) from exc
        return False


def publish(new: Path, final: Path) -> None:
    """Put `new` under the name `final`: an existing `final` is moved aside first and removed only
    once `new` is in place, so at every moment one complete version exists."""
    if not final.exists():
        os.rename(new, final)
        return
    aside = temporary_sibling(final, "old")
    os.rename(final, aside)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(aside, final)
        raise
    if aside.is_dir():
        shutil.rmtree(aside)
    else:
        aside.unlink()


class NewFile:
    """A file written under a new temporary sibling name and renamed onto `path` when complete.

    The temporary, `<name>.tmp-<pid>-<hex>`, is created with O_CREAT|O_EXCL|O_NOFOLLOW, so a symlink or file
    planted under that name is never followed nor reused; the mode honours the umask. Write to `stream`,
    then `commit()` (fsync, rename) or `discard()`; as a context manager it commits unless the block fails.
    Every file writer goes through this: reports, plans, predictions, indexed datasets and their caches,
    the demo's data.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> None:
        self.path = Path(path)
        self.tmp = self.path.parent / f"{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}"
        descriptor = os.open(self.tmp, _NEW_FILE_FLAGS, 0o666)
        self.stream = os.fdopen(descriptor, mode, **open_kwargs)

    def commit(self) -> Path:
        try:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            os.replace(self.tmp, self.path)  # a rename replaces a link at `path` itself, never its target
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        try:
            self.stream.close()  # may fail itself (a full disk met while flushing)
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self.stream

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.commit()
        else:
            self.discard()
        return False


def write_output_file(target: OutputTarget, kind: FileKind, data: str | bytes) -> Path:
    """Write `data` to `target.path` through a NewFile; checks as check_output_file (call that early
    too, before the work that produces `data`)."""
    check_output_file(target, kind)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with write_errors(target.path, target):
        with NewFile(target.path) as stream:
            stream.write(payload)
    return target.path


__all__ = [
    "FileKind",
    "FolderKind",
    "NewFile",
    "OutputError",
    "OutputFolder",
    "OutputTarget",
    "as_target",
    "check_output_file",
    "check_output_folder",
    "describe_write_error",
    "probe_writable",
    "publish",
    "remove_leftovers",
    "user_path",
    "write_errors",
    "write_output_file",
]
