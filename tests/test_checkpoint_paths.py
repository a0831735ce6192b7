"""Checkpoint paths are bytes: a file name that is not valid UTF-8 loads like any other.

Python holds such a name as a str with surrogate escapes (``os.fsdecode``), which is also what it
makes of the command line's bytes; the files are created from raw bytes in pytest's tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from densepure_rt.cli import main

ASSET = Path(__file__).resolve().parents[1] / "densepure_rt" / "assets" / "digits_unet.safetensors"
_SCRIPT = Path(sys.executable).with_name("densepure-rt")


def non_utf8_copy(folder: Path, suffix: bytes, source: Path = ASSET) -> str:
    """A copy of ``source`` named b'ck\\xff<suffix>' in ``folder``; returns the name as Python holds it."""
    target = os.fsencode(folder) + b"/ck\xff" + suffix
    shutil.copyfile(source, target)
    return os.fsdecode(target)


def test_safetensors_and_torch_files_with_non_utf8_names_load_the_same_tensors(tmp_path):
    import torch
    from safetensors.torch import load_file

    from densepure_rt.export.checkpoints import load_state_dict

    reference = load_file(str(ASSET))
    name = non_utf8_copy(tmp_path, b".safetensors")
    with pytest.raises(UnicodeEncodeError):
        name.encode("utf-8")  # the name really is not UTF-8
    state = load_state_dict(name)
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    torch.save(reference, tmp_path / "plain.pt")
    state = load_state_dict(non_utf8_copy(tmp_path, b".pt", tmp_path / "plain.pt"))
    assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in reference)


def test_build_takes_a_diffusion_checkpoint_whose_name_is_not_utf8(tmp_path):
    name = non_utf8_copy(tmp_path, b".safetensors")
    out = tmp_path / "engine"
    result = CliRunner().invoke(main, ["build", "--model", "digits", "--diffusion-ckpt", name, "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert os.fsencode(manifest["build"]["diffusion_ckpt"]) == os.fsencode(tmp_path) + b"/ck\xff.safetensors"


@pytest.mark.slow
@pytest.mark.skipif(not _SCRIPT.is_file(), reason="the console script is not installed")
def test_console_script_builds_from_a_non_utf8_argv(tmp_path):
    """The real process: argv holds the raw byte 0xff."""
    name = non_utf8_copy(tmp_path, b".safetensors")
    out = tmp_path / "engine"
    proc = subprocess.run([os.fsencode(_SCRIPT), b"build", b"--model", b"digits", b"--diffusion-ckpt", os.fsencode(name),
                           b"--out", os.fsencode(out)], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert (out / "manifest.json").is_file()
