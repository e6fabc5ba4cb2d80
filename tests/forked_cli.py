"""`python -m <module> <args>` for tests, forked from a process that has already imported torch,
transformers, MLflow and dwbench (multiprocessing's forkserver, one per test process).

Each new interpreter pays 5-9 s of imports before dwbench does anything, and the suite runs the
CLI dozens of times: that was most of its time. A forked command is still a process of its own,
with its own pid, environment, working directory, output files, exit code and signals; it runs
the module as `python -m` does (`runpy`, then the exit handlers). What it skips is the
interpreter's start and the imports, which fresh interpreters still cover: tests/test_install.py
(an installed copy), the SLURM tests (jobs started by slurmd) and the tests that compare two
processes. A command whose environment differs from the forkserver's in anything that is read at
import time (PYTHONPATH, say) is refused: such a test runs its command with subprocess. (It used
to fall back to a subprocess silently, which hid that every command after a cell run in the test
process, where MLflow sets MLFLOW_TRACKING_URI, started a fresh interpreter.)
"""

from __future__ import annotations

import atexit
import io
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

# What the forkserver imports once: what a cell imports, found by listing the modules a forked
# tiny cell (train, evaluate) still imported itself: 813 with torch, transformers, peft, MLflow
# and dwbench alone preloaded (its run took 8.3 s), about 20 with this list (4.6 s).
PRELOAD = [
    "torch",
    "transformers",
    "transformers.generation.utils",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.trainer",
    "peft",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",  # a store's first use: SQLAlchemy, alembic
    "mlflow.store.tracking.sqlalchemy_workspace_store",
    "mlflow.tracing.processor.otel",
    "opentelemetry.sdk.metrics",
    "sqlalchemy.dialects.sqlite",
    "alembic.command",
    "lm_eval",  # evaluate: lm-eval, datasets, scipy
    "lm_eval.tasks",
    "lm_eval.evaluator",
    "lm_eval.models.huggingface",
    "datasets",
    "scipy.io",
    "pandas",
    "hydra",
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
    "rich.console",
    "dwbench.cli",
    "dwbench.pipeline",
    "dwbench.lora",
    "dwbench.lm_eval_runner",
    "dwbench.results_table",
    "dwbench.methods.random_method",
    "dwbench.methods.data_whisperer",
]
# Read when they are used, not when a module is imported: these may differ from the forkserver's.
RUNTIME_ENV = {"DWBENCH_CACHE", "PYTEST_CURRENT_TEST", "SLURM_CONF", "PATH"}
# Every command the tests fork is offline; huggingface_hub reads this once, at import.
OFFLINE = {"HF_HUB_OFFLINE": "1"}

_context: multiprocessing.context.ForkServerContext | None = None
_server_env: dict[str, str] = {}


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """This test process's forkserver, started (with its imports) on first use."""
    global _context, _server_env
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.update(OFFLINE)
        try:
            _server_env = dict(os.environ)
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _context = context
    return _context


def _check_forkable(env: dict[str, str]) -> None:
    """A command is forked only where what it is given differs from the forkserver's environment
    in nothing read at import (RUNTIME_ENV is read at run time).

    What counts is what the test gives the command beyond this process's environment, and
    PYTHONPATH: this process's environment drifts by itself, and the forkserver's alike
    (libraries set variables as they are imported: sklearn KMP_*, lm-eval
    HF_XET_HIGH_PERFORMANCE; a cell run in this process sets MLFLOW_TRACKING_URI).
    """
    _forkserver()
    given = {k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)}
    differ = sorted(
        k for k in (given | {"PYTHONPATH"}) - RUNTIME_ENV if env.get(k) != _server_env.get(k)
    )
    if differ:
        raise ValueError(
            f"forked_cli: the environment differs from the forkserver's in {differ}; run this "
            "command with subprocess, or add the variables to RUNTIME_ENV if they are read only "
            "at run time"
        )


def _in_child(
    env: dict[str, str], cwd: str, out: str, err: str, function: Any, args: tuple
) -> None:
    """The forked child: `function(*args)` with this environment, folder and output, ending as
    the interpreter ends a program (SystemExit's code, a traceback and 1, then the exit
    handlers)."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    sys.stdin = open(os.devnull)  # noqa: SIM115
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    code: Any = 0
    try:
        function(*args)
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # what the interpreter prints for an uncaught exception
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _run_module(module: str, args: list[str]) -> None:
    """`python -m module args`."""
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class ForkedProcess:
    """The parts of `subprocess.Popen` the tests use, for a forked command."""

    def __init__(
        self, process: multiprocessing.Process, out: Path, err: Path, scratch: Path | None
    ) -> None:
        self._process, self._streams, self._scratch = process, (out, err), scratch
        self.pid = process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._process.is_alive():
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(str(self._process.name), timeout or 0)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        self.wait(timeout)
        if self._scratch is None:
            return None, None
        out, err = (p.read_text() if p.parent == self._scratch else None for p in self._streams)
        shutil.rmtree(self._scratch)
        return out, err


def _output_path(stream: Any, scratch: Path | None, name: str) -> Path:
    """Where the child writes a stream: a scratch file the test reads back (PIPE), a file the
    test gave, or else the null device."""
    if stream is subprocess.PIPE and scratch is not None:
        return scratch / name
    if hasattr(stream, "name"):
        return Path(stream.name)
    return Path(os.devnull)


def popen(
    command: list[str], cwd: Path | str, env: dict[str, str], stdout: Any = None, stderr: Any = None
) -> ForkedProcess | subprocess.Popen:
    """`subprocess.Popen(command, ...)` for `[sys.executable, "-m", module, *args]`, forked (text
    mode: what `communicate` returns is text)."""
    if command[:2] != [sys.executable, "-m"]:
        raise ValueError(f"forked_cli runs `python -m <module>` only, not {command[:3]}")
    return start(_run_module, (command[2], command[3:]), cwd, env, stdout, stderr)


def start(
    function: Any,
    args: tuple,
    cwd: Path | str,
    env: dict[str, str],
    stdout: Any = None,
    stderr: Any = None,
) -> ForkedProcess:
    """`function(*args)` (a module-level function) in a process forked from the forkserver."""
    _check_forkable(env)
    pipes = subprocess.PIPE in (stdout, stderr)
    scratch = Path(tempfile.mkdtemp(prefix="forked-cli-")) if pipes else None
    out = _output_path(stdout, scratch, "stdout")
    err = _output_path(stderr, scratch, "stderr")
    process = _forkserver().Process(
        target=_in_child, args=(env, str(cwd), str(out), str(err), function, args)
    )
    process.start()
    return ForkedProcess(process, out, err, scratch)


def run(
    command: list[str], cwd: Path | str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, ...)`, forked."""
    process = popen(command, cwd, env, subprocess.PIPE, subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
