"""A quiet console for `lineray generate`: our lines and one progress bar on the terminal, Ray's output in a file.

Ray and Ray Data write INFO blocks, a progress-UI notice and C++ warnings
(core_worker) straight to the process's stdout/stderr file descriptors, from Python
and from C++. `quiet_console` points fds 1 and 2 at a log file for the whole job
and hands back a stream on the real terminal for the "lineray" logger and the
progress bar. At the end the file moves into the output (`_logs/`), or stays in
the temp dir when the job never opened its output; its path is printed once.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager

PREFIX = "[lineray] "


def log_to(stream) -> logging.Handler:
    """Send the "lineray" logger's INFO lines to `stream` as `[lineray] message`."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
    logger = logging.getLogger("lineray")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


@contextmanager
def quiet_console(output: str | None, storage_options: dict | None = None, verbose: bool = False):
    """Yields the terminal stream; while inside, everything else written to fds 1/2 goes to a log file."""
    if verbose:
        handler = log_to(sys.stderr)
        try:
            yield sys.stderr
        finally:
            logging.getLogger("lineray").removeHandler(handler)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd, path = tempfile.mkstemp(prefix="lineray-generate-", suffix=".log")
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = sys.stderr if not _on_fd(sys.stderr, 2) else os.fdopen(os.dup(saved_err), "w", buffering=1)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    handler = log_to(terminal)
    log_file = os.fdopen(os.dup(fd), "w", buffering=1)
    file_handler = log_to(log_file)  # our lines in the file too, between Ray's
    try:
        yield terminal
    finally:
        for h in (handler, file_handler):
            logging.getLogger("lineray").removeHandler(h)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        log_file.close()
        for f in (saved_out, saved_err, fd):
            os.close(f)
        if _only_ours(path):  # Ray never started (refused early): nothing worth keeping
            os.remove(path)
        else:
            print(f"{PREFIX}Ray's output: {_keep(path, output, storage_options or {})}", file=terminal, flush=True)
        if terminal is not sys.stderr:
            terminal.close()


def _on_fd(stream, fd: int) -> bool:
    """Whether `stream` writes to file descriptor `fd` (pytest's capture and notebooks replace sys.stderr)."""
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


def _only_ours(path: str) -> bool:
    with open(path, errors="replace") as f:
        return all(line.startswith(PREFIX) or not line.strip() for line in f)


def _keep(path: str, output: str | None, storage_options: dict) -> str:
    """Move the log into OUTPUT/_logs/ when the output is this job's (it has _job.json); else leave it."""
    from lineray.pipelines.sink import Output

    if not output:
        return path
    try:
        out = Output(output, storage_options)
        if not out.fs.exists(out.path("_job.json")):
            return path
        target = out.path("_logs", time.strftime("generate-%Y%m%d-%H%M%S.log", time.gmtime()))
        with open(path, "rb") as f:
            out.write_atomic(target, f.read())
        os.remove(path)
        return target if out.is_local else f"{output.rstrip('/')}/{out.relative(target)}"
    except Exception:  # noqa: BLE001 - the log stays where it is; the job's own result is what matters
        return path
