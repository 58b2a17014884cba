"""The run folder (trainer.default_root_dir) is one run's: a lock while a run writes to it, a refusal to start a second
run over a finished one unless the user resumes it or says so, and checkpoints written atomically inside it."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

LOCK = ".run.lock"
TMP_MARK = ".tmp-"


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message says what to do."""


def is_main_process() -> bool:
    """True in the process that owns the run folder: rank 0 of a launch (torchrun / Lightning's launcher set RANK or
    LOCAL_RANK in the others)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def holds_a_run(root: Path) -> bool:
    return (root / "config.yaml").is_file() or any((root / "checkpoints").glob("*.ckpt"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """Claims `root` for one run (see the module docstring).

    resuming: the run continues a checkpoint (--ckpt_path), so the folder may already hold its earlier part.
    reuse:    the user asked to start a new run in a folder that holds one (its files are kept; config.yaml and
              last.ckpt are replaced as the new run writes them).
    """

    def __init__(self, root: str | os.PathLike, resuming: bool = False, reuse: bool = False):
        self.root, self.resuming, self.reuse = Path(root), resuming, reuse
        self.lock = self.root / LOCK
        self.held = False

    def check(self) -> None:
        """Refuse, before anything is built or written, a folder this run may not use."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise RunFolderError(f"run folder {str(root)!r} is a file; give --trainer.default_root_dir a folder")
        if holds_a_run(root) and not (self.resuming or self.reuse):
            last = root / "checkpoints" / "last.ckpt"
            resume = f"resume it with --ckpt_path {last}" if last.exists() else "resume it with --ckpt_path <its checkpoint>"
            raise RunFolderError(f"{str(root)!r} already holds a run (config.yaml / checkpoints); {resume}, give another "
                                 f"--trainer.default_root_dir, or pass --reuse_run_folder true to start a new run there "
                                 f"(its files are kept, config.yaml and last.ckpt are replaced)")

    def claim(self) -> None:
        """check(), then create the folder and hold its lock until `release`."""
        self.check()
        root = self.root
        self.created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except (PermissionError, NotADirectoryError, FileExistsError) as e:
            raise RunFolderError(f"cannot create run folder {str(root)!r} ({e.strerror or e}); give "
                                 f"--trainer.default_root_dir a folder you can write") from None
        self._lock()
        clean_stale_temporaries(root / "checkpoints")

    def _lock(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise RunFolderError(f"another run (process {pid}) is writing to {str(self.root)!r}; wait for it, "
                                         f"stop it, or give another --trainer.default_root_dir") from None
                self.lock.unlink(missing_ok=True)  # left by a run that was killed
                continue
            except PermissionError:
                raise RunFolderError(f"cannot write to run folder {str(self.root)!r}; give --trainer.default_root_dir a "
                                     f"folder you can write") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return

    def release(self) -> None:
        """Drop the lock; a folder this run created and left empty (it failed before writing anything) goes too."""
        if self.held:
            self.lock.unlink(missing_ok=True)
            self.held = False
            if getattr(self, "created", False) and not any(self.root.iterdir()):
                self.root.rmdir()


def clean_stale_temporaries(folder: Path) -> None:
    """Remove the half-written checkpoint files (`.<name>.tmp-<pid>`) of processes that no longer run."""
    if not folder.is_dir():
        return
    for tmp in folder.glob(f".*{TMP_MARK}*"):
        try:
            pid = int(tmp.name.rsplit(TMP_MARK, 1)[1])
        except ValueError:
            continue
        if not _alive(pid) and tmp.is_file():
            tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a hidden file beside the target (`.<name>.tmp-<pid>`, same folder, so the same filesystem),
    flushed to disk, then renamed over the target: a kill at any moment leaves the previous checkpoint or the new one,
    never a truncated file. (Lightning's own writer streams into the target.)"""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
