"""tcmalloc for CPU runs: ``cli.py`` restarts itself with tcmalloc preloaded when the system has it.

PyTorch on CPU allocates and frees parameter- and activation-sized buffers every step. glibc's malloc serves blocks
above its mmap threshold with fresh ``mmap`` calls, so each step faults in and zeroes those pages again (half of a
Medusa training run's CPU time showed as system time). tcmalloc keeps freed spans for reuse; Intel's guidance for
PyTorch on CPUs is to preload it (``torch.backends.xeon.run_cpu --enable-tcmalloc`` does the same, but only finds
an unversioned ``libtcmalloc.so``, which Debian ships in the -dev package). Measured here with
``benchmarks/train_throughput.py --allocator system tcmalloc`` (benchmarks/results/train_throughput.md).

An allocator cannot be swapped once the process runs, so :func:`restart_with_tcmalloc` re-executes the same command
with ``LD_PRELOAD`` set, before torch is imported. ``SPEC_LIGHTNING_ALLOCATOR=system`` keeps glibc's malloc;
``=tcmalloc`` makes a missing library an error instead of a note. ``install.sh`` installs Debian's
``libtcmalloc-minimal4`` where it can.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ALLOCATOR_ENV = "SPEC_LIGHTNING_ALLOCATOR"  # "auto" (default), "tcmalloc" or "system"
RESTARTED_ENV = "SPEC_LIGHTNING_ALLOCATOR_RESTARTED"  # set on the restarted process: never restart twice
LIBRARY_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
               "/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib", "/usr/local/lib64")


def find_tcmalloc(search_dirs: tuple[str, ...] | None = None) -> str | None:
    """Path of a tcmalloc shared library: the active environment's ``lib`` first (conda, venv), then the system's
    (``SEARCH_DIRS`` unless ``search_dirs`` is given)."""
    dirs = [f"{os.environ[v]}/lib" for v in ("CONDA_PREFIX", "VIRTUAL_ENV") if os.environ.get(v)]
    dirs += list(SEARCH_DIRS if search_dirs is None else search_dirs)
    for directory in dirs:
        for name in LIBRARY_NAMES:
            if (Path(directory) / name).is_file():
                return str(Path(directory) / name)
    return None


def active_allocator(env: dict[str, str] | None = None) -> str:
    """``"tcmalloc (<path>)"`` if ``env`` (default: this process's) preloads tcmalloc, else ``"glibc malloc"``."""
    preload = (os.environ if env is None else env).get("LD_PRELOAD", "")
    preloaded = [p for p in preload.replace(":", " ").split() if "tcmalloc" in p]
    return f"tcmalloc ({preloaded[0]})" if preloaded else "glibc malloc"


def preload_environment(library: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's) with ``library`` first in ``LD_PRELOAD``."""
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    return env


def restart_with_tcmalloc(argv: list[str] | None = None) -> None:
    """Replace this process by the same command (``argv``: the interpreter's arguments, default
    ``sys.orig_argv[1:]``) with tcmalloc preloaded; return if that is not wanted or possible.

    Call it first thing in a ``__main__`` (before torch is imported; nothing is lost by the exec). Returns when
    ``SPEC_LIGHTNING_ALLOCATOR=system``, on non-Linux systems, when tcmalloc is already preloaded or this process was
    already restarted once, or when no library is found (a ``ValueError`` with ``SPEC_LIGHTNING_ALLOCATOR=tcmalloc``).
    """
    choice = os.environ.get(ALLOCATOR_ENV, "auto").strip().lower()
    if choice not in ("auto", "tcmalloc", "system"):
        raise ValueError(f"{ALLOCATOR_ENV}={choice!r}: expected 'auto', 'tcmalloc' or 'system'")
    if choice == "system" or not sys.platform.startswith("linux") or os.environ.get(RESTARTED_ENV):
        return
    if active_allocator() != "glibc malloc":
        return
    library = find_tcmalloc()
    if library is None:
        if choice == "tcmalloc":
            raise ValueError(f"{ALLOCATOR_ENV}=tcmalloc but no tcmalloc library in {', '.join(SEARCH_DIRS)} "
                             "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
        return
    env = preload_environment(library)
    env[RESTARTED_ENV] = "1"
    # tcmalloc prints a "large alloc" line for every allocation above 1 GiB (full-vocabulary logits at long T)
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**40))
    # the original command line keeps the interpreter's own flags (python -S, -X ...), which sys.argv drops
    args = list(sys.orig_argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], env)
