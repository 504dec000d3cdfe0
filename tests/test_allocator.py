"""cli.py's restart with tcmalloc preloaded: found where it is, exec'd once, opt-out, clear errors, and the command
line and its output unchanged (subprocesses: an exec replaces the process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spec_lightning import allocator
from spec_lightning.allocator import ALLOCATOR_ENV, RESTARTED_ENV, find_tcmalloc, restart_with_tcmalloc

REPO = Path(__file__).resolve().parents[1]
# Prints what the process it ends up in sees; a restart re-runs this script from the top with the same arguments.
SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
print("started", flush=True)
from spec_lightning.allocator import restart_with_tcmalloc
restart_with_tcmalloc()
maps = open("/proc/self/maps").read()
print(json.dumps({{"argv": sys.argv[1:], "no_site": sys.flags.no_site, "preload": os.environ.get("LD_PRELOAD", ""),
                   "restarted": os.environ.get("{restarted}"), "mapped": "tcmalloc" in maps}}))
"""


def run_script(tmp_path: Path, env: dict[str, str], *args: str, flags: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT.format(repo=str(REPO), restarted=RESTARTED_ENV))
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", RESTARTED_ENV, ALLOCATOR_ENV,
                                                              "VIRTUAL_ENV", "CONDA_PREFIX")}
    proc = subprocess.run([sys.executable, *flags, str(script), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    return lines, json.loads(lines[-1])


@pytest.fixture
def fake_env_lib(tmp_path):
    """A virtual environment whose lib/ holds a file named like tcmalloc (the real one when the system has it)."""
    lib = tmp_path / "venv" / "lib"
    lib.mkdir(parents=True)
    real = find_tcmalloc()
    target = lib / "libtcmalloc_minimal.so.4"
    if real:
        target.symlink_to(real)
    else:
        target.write_bytes(b"not an ELF file")  # ld.so warns "cannot be preloaded" and carries on
    return tmp_path / "venv", target, real is not None


def test_restarts_once_with_the_library_preloaded_and_the_same_arguments(tmp_path, fake_env_lib):
    venv, library, is_real = fake_env_lib
    lines, seen = run_script(tmp_path, {"VIRTUAL_ENV": str(venv)}, "fit", "--config", "a b.yaml", flags=("-S",))
    assert lines.count("started") == 2  # the script ran twice: before and after the exec, and not a third time
    assert seen["argv"] == ["fit", "--config", "a b.yaml"] and seen["no_site"] == 1  # interpreter flags kept too
    assert seen["preload"].split(":")[0] == str(library) and seen["restarted"] == "1"
    assert seen["mapped"] == is_real


def test_system_choice_and_an_already_preloaded_library_do_not_restart(tmp_path, fake_env_lib):
    venv, library, _ = fake_env_lib
    lines, seen = run_script(tmp_path, {"VIRTUAL_ENV": str(venv), ALLOCATOR_ENV: "system"})
    assert lines.count("started") == 1 and seen["preload"] == "" and seen["restarted"] is None
    lines, seen = run_script(tmp_path, {"VIRTUAL_ENV": str(venv), "LD_PRELOAD": str(library)})
    assert lines.count("started") == 1 and seen["restarted"] is None


def test_no_library_found(monkeypatch):
    monkeypatch.setattr(allocator, "SEARCH_DIRS", ())
    for var in ("VIRTUAL_ENV", "CONDA_PREFIX", "LD_PRELOAD", RESTARTED_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("must not exec"))
    monkeypatch.setenv(ALLOCATOR_ENV, "auto")
    assert find_tcmalloc() is None and restart_with_tcmalloc() is None  # auto: glibc's malloc, no error
    monkeypatch.setenv(ALLOCATOR_ENV, "tcmalloc")
    with pytest.raises(ValueError, match="SPEC_LIGHTNING_ALLOCATOR=tcmalloc but no tcmalloc library"):
        restart_with_tcmalloc()
    monkeypatch.setenv(ALLOCATOR_ENV, "jemalloc")
    with pytest.raises(ValueError, match="SPEC_LIGHTNING_ALLOCATOR='jemalloc': expected"):
        restart_with_tcmalloc()


def test_cli_reports_a_bad_choice_in_one_line():
    env = {**os.environ, ALLOCATOR_ENV: "fast"}
    env.pop(RESTARTED_ENV, None)
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", "--help"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: SPEC_LIGHTNING_ALLOCATOR='fast': expected 'auto', 'tcmalloc' or 'system'"]
