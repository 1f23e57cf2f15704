"""The output folder of a run: its default name, the checks before any work, the staging folder that
becomes ``out`` only when everything passed, and the timing of the run's phases."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .config import CutConfig, SourceConfig
from .errors import MaskPruneError

__all__ = ["default_out", "check_output_path", "staging", "Phases", "machine_info", "resolve_device"]

log = logging.getLogger(__name__)


def default_out(source: SourceConfig, cut: CutConfig) -> Path:
    """``runs/<model>-s<sparsity %>`` (or ``-b<budget>``), ``runs/<model>-distilled`` for a distillation."""
    name = Path(source.model.rstrip("/")).name.replace(".gguf", "") or "model"
    if source.has_teacher:
        return Path("runs") / f"{name}-distilled"
    tag = f"s{round(cut.sparsity * 100)}" if cut.budget_params is None else f"b{cut.budget_params}"
    return Path("runs") / f"{name}-{tag}"


def check_output_path(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, exists (without --overwrite) or sits in a read-only folder."""
    if out.is_file():
        raise MaskPruneError(f"--out {str(out)!r} is a file", expected="a folder path", fix="choose another --out")
    if out.exists() and not overwrite:
        raise MaskPruneError(
            f"output folder {str(out)!r} already exists", fix="pass --overwrite to replace it, or choose another --out"
        )
    parent = out.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise MaskPruneError(
            f"cannot write the output folder {str(out)!r}",
            found=f"{str(probe)!r} is not a writable folder",
            fix="choose an --out in a writable location",
        )


@contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A folder named like ``out`` inside a hidden temporary folder beside it (so what reads the folder's name,
    the GGUF converter, sees the final one), renamed to ``out`` on success; all removed on failure."""
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.absolute().parent))
    tmp = holder / out.name
    tmp.mkdir()
    try:
        yield tmp
        if out.exists() and overwrite:
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the hidden staging folders of ``out`` that a killed run left (``.NAME.partial-PID-*`` and
    ``.NAME.old-PID`` whose process is gone: a run killed with -9 cannot clean up after itself); returns them."""
    removed = []
    import glob

    for path in out.absolute().parent.glob(f".{glob.escape(out.name)}.*"):
        rest = path.name[len(out.name) + 2 :]
        kind, _, tail = rest.partition("-")
        pid = tail.split("-")[0]
        if kind in ("partial", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        names = ", ".join(p.name for p in removed)
        log.info("removed %d staging folder(s) left by a killed run: %s", len(removed), names)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Phases:
    """Wall-clock seconds (the report's ``seconds``) and peak resident memory (the report's ``memory``) of each named
    phase of a run.

    A phase's peak is the whole process's resident set at its highest during the phase: exact where the phase set
    a new high for the process (Linux's high-water mark ``VmHWM`` rose during it), else the highest of samples
    taken every ``sample_seconds`` while it ran. The high-water mark is never reset, so ``/usr/bin/time -v`` still
    reads the process's true peak. A phase inside another counts toward both. On a CUDA run the device's peak
    allocated bytes are recorded per phase too."""

    def __init__(self, sample_seconds: float = 0.02) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}
        self.peak_device: dict[str, int] = {}
        self._sampler = _RssSampler(sample_seconds)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        log.info("phase %s ...", name)
        mark = self._sampler.open()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t, 3)
            self.peak_rss[name] = max(self._sampler.close(mark), self.peak_rss.get(name, 0))
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self.peak_device[name] = int(torch.cuda.max_memory_allocated())

    def memory(self) -> dict:
        """The report's ``memory`` section: per phase, the peak resident bytes (and the device's, on a GPU)."""
        out: dict = {
            "peak_rss_bytes": dict(self.peak_rss),
            "process_peak_rss_bytes": process_peak_rss_bytes(),
            "protocol": "peak resident set of the whole process during each phase: the high-water mark (VmHWM) where "
            "the phase raised it, else the highest of samples every 20 ms",
        }
        if self.peak_device:
            out["peak_device_bytes"] = dict(self.peak_device)
        return out


class _RssSampler:
    """Samples the process's resident size in a daemon thread while any phase is open."""

    def __init__(self, interval: float) -> None:
        import threading

        self.interval = interval
        self._lock = threading.Lock()
        self._open: dict[int, list[int]] = {}  # phase token -> [highest sample, VmHWM at its start]
        self._next = 0
        self._thread: threading.Thread | None = None

    def open(self) -> int:
        import threading

        with self._lock:
            token, self._next = self._next, self._next + 1
            self._open[token] = [current_rss_bytes() or 0, peak_rss_bytes() or 0]
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="maskprune-rss", daemon=True)
                self._thread.start()
        return token

    def close(self, token: int) -> int:
        now, hwm = current_rss_bytes() or 0, peak_rss_bytes() or 0
        with self._lock:
            highest, hwm_at_start = self._open.pop(token)
        return hwm if hwm > hwm_at_start else max(highest, now)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            rss = current_rss_bytes() or 0
            with self._lock:
                if not self._open:
                    self._thread = None
                    return
                for entry in self._open.values():
                    entry[0] = max(entry[0], rss)


def current_rss_bytes() -> int | None:
    """The process's resident size now (``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int | None:
    """The process's resident high-water mark (``VmHWM``), else its peak from ``getrusage``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process_peak_rss_bytes()


def process_peak_rss_bytes() -> int | None:
    """The process's peak resident size over its life (``ru_maxrss``; what ``/usr/bin/time -v`` reports)."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MaskPruneError(f"device {name!r} is not available", fix="use --device cpu")
    return dev


def machine_info(device: torch.device) -> dict:
    """Platform, versions, device and threads: recorded in every report and results file."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    try:
        import peft
        import transformers  # noqa: E401

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":  # pragma: no cover
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
