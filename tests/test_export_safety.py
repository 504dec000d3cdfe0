"""Exports never destroy a user's files, never leave leftovers behind, and never write non-finite weights."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from spec_lightning.atomic import clean_stale
from spec_lightning.drafts.medusa import MedusaConfig, MedusaHeads
from spec_lightning.export.common import MARKER
from spec_lightning.export.medusa import load_medusa_heads, write_medusa

CFG = MedusaConfig(hidden_size=16, vocab_size=32, num_heads=2, num_layers=1)


def heads_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    heads = MedusaHeads(CFG)
    for p in heads.parameters():
        nn.init.normal_(p, std=0.1)
    return heads.state_dict()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_existing_file_is_refused_and_kept(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(ValueError, match="is an existing file"):
        write_medusa(target, heads_state(), CFG)
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # not hidden under a dot-name


def test_foreign_directory_is_refused_unless_overwrite_and_its_files_survive(tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "weights.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="not a spec_lightning export.*--overwrite"):
        write_medusa(out, heads_state(), CFG)
    assert (out / "config.json").read_text() == '{"mine": true}'
    write_medusa(out, heads_state(), CFG, overwrite=True)
    assert (out / "weights.bin").read_bytes() == b"\x00\x01"  # files the exporter did not write are kept
    assert torch.equal(load_medusa_heads(out).lm_heads[0].weight, heads_state()["lm_heads.0.weight"])


def test_previous_export_is_updated_keeping_user_files(tmp_path):
    out = write_medusa(tmp_path / "m", heads_state(0), CFG, layout="vllm")
    (out / "README.md").write_text("served since Monday")
    write_medusa(out, heads_state(1), CFG, layout="original")  # no --overwrite needed: it is our export
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "medusa_lm_head.safetensors", MARKER]  # old model.safetensors gone
    assert torch.equal(load_medusa_heads(out).lm_heads[1].weight, heads_state(1)["lm_heads.1.weight"])


def test_leftovers_of_a_killed_export_are_cleaned(tmp_path):
    pid = dead_pid()
    stale_tmp = tmp_path / f".m.tmp-{pid}-abcd"
    stale_tmp.mkdir()
    (stale_tmp / "model.safetensors").write_bytes(b"half")
    out = write_medusa(tmp_path / "m", heads_state(), CFG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # killed between moving the old export aside and renaming the new one in: the old one comes back
    out.rename(tmp_path / f".m.old-{pid}")
    clean_stale(out)
    assert (out / "model.safetensors").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_live_writers_temp_dirs_are_left_alone(tmp_path):
    live = tmp_path / f".m.tmp-{subprocess.os.getpid()}-zz"
    live.mkdir()
    assert clean_stale(tmp_path / "m") == [] and live.is_dir()


def test_non_finite_weights_are_refused_before_writing(tmp_path):
    state = heads_state()
    state["blocks.1.layers.0.weight"][0, 0] = float("nan")
    state["lm_heads.0.weight"][1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite weights: .*blocks\.1\.layers\.0\.weight \(1 of 256"):
        write_medusa(tmp_path / "m", state, CFG)
    assert not any(tmp_path.iterdir())


def test_eagle3_export_refuses_an_all_nan_draft(tmp_path):
    from spec_lightning.drafts.eagle3 import Eagle3Config, Eagle3Draft
    from spec_lightning.export.eagle3 import write_eagle3

    draft = Eagle3Draft(Eagle3Config.tiny())
    with torch.no_grad():
        for p in draft.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"EAGLE-3 export: refusing to export non-finite weights: fc\.weight"):
        write_eagle3(tmp_path / "d", draft.state_dict(), draft.config)
    assert not any(tmp_path.iterdir())


# --- a mount point (issue 28): the directory itself can never be renamed, and it is another file system -------------
@pytest.fixture
def mount_point(tmp_path, monkeypatch):
    """``tmp_path/mnt``, behaving like an (empty) mount point: renaming it fails with EBUSY, and renaming a file into
    it from outside fails with EXDEV (another file system)."""
    import errno
    import os
    from pathlib import Path

    out = tmp_path / "mnt"
    out.mkdir()
    real_replace, real_rename = os.replace, os.rename

    def guarded(real):
        def move(src, dst, *args, **kwargs):
            src_p, dst_p = Path(src), Path(dst)
            if src_p == out:
                raise OSError(errno.EBUSY, "Device or resource busy", str(src))
            if dst_p.parent == out and not src_p.is_relative_to(out):
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "replace", guarded(real_replace))
    monkeypatch.setattr(os, "rename", guarded(real_rename))
    return out


def test_an_empty_mount_point_is_exported_into_in_place(mount_point):
    write_medusa(mount_point, heads_state(0), CFG)
    assert sorted(p.name for p in mount_point.iterdir()) == sorted(["config.json", MARKER, "model.safetensors"])
    assert torch.equal(load_medusa_heads(mount_point).lm_heads[0].weight, heads_state(0)["lm_heads.0.weight"])
    write_medusa(mount_point, heads_state(1), CFG)  # and again, now marker-owned
    assert torch.equal(load_medusa_heads(mount_point).lm_heads[0].weight, heads_state(1)["lm_heads.0.weight"])


def test_a_failed_export_into_a_mount_point_leaves_it_as_it_was(mount_point):
    def fail(tmp):
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError, match="killed while writing"):
        write_medusa(mount_point, heads_state(), CFG, extra_writer=fail)
    assert list(mount_point.iterdir()) == []  # no half export, no temp directory left inside


# --- disk full (issue 28): the size is known, so it is checked before writing ---------------------------------------
def test_an_export_that_does_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    out = write_medusa(tmp_path / "m", heads_state(0), CFG)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    needed = sum(t.numel() * t.element_size() for t in heads_state().values())  # 2 heads: 2 * (16*16 + 16 + 32*16)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=rf"not enough disk space to write {out}: {needed} bytes needed, 1000 bytes "
                                             rf"free in {out}; free some space or write elsewhere"):
        write_medusa(out, heads_state(1), CFG)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export survives unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
