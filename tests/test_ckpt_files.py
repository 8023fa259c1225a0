"""Nothing lost, nothing silent: convert never deletes its input, damaged checkpoints are named, not loaded.

Damage is done to real checkpoints written by `convert` (from a transformers
checkpoint) and `save`; the reference for "undamaged" is the byte-for-byte copy
made before the damage.
"""

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import FAST_COMPILE
import mixtral_jax as mj
from mixtral_jax import ckpt_files, convert, testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _env():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = FAST_COMPILE  # one CPU device
    return env


def _cli(module, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", f"mixtral_jax.{module}", *map(str, args)], capture_output=True,
                          text=True, env=_env(), timeout=timeout)


def _listing(root):
    """Every file under root with its bytes: what must survive a refused command."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "Mixtral-tiny")
    testing.write_hf_checkpoint(testing.hf_model(seed=4), path, max_shard_size="200KB")
    return path


@pytest.fixture(scope="module")
def good_ckpt(hf_dir, tmp_path_factory):
    return mj.convert_hf_checkpoint(hf_dir, tmp_path_factory.mktemp("good") / "ckpt", dtype="float32")


# --- convert never deletes what it did not write -------------------------------------------------

def _work_dir_with_input(hf_dir, tmp_path):
    """tmp_path/work holding a copy of the HF checkpoint and someone's other project."""
    work = tmp_path / "work"
    shutil.copytree(hf_dir, work / "hf")
    (work / "other_project").mkdir()
    (work / "other_project" / "notes.txt").write_text("keep me")
    return work


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_convert_refuses_out_that_is_around_or_inside_the_input(where, hf_dir, tmp_path):
    work = _work_dir_with_input(hf_dir, tmp_path)
    before = _listing(work)
    out = {"same": work / "hf", "parent": work, "inside": work / "hf" / "ckpt"}[where]
    with pytest.raises(ValueError, match="input directory"):
        mj.convert_hf_checkpoint(work / "hf", out, overwrite=True)
    assert _listing(work) == before


def test_convert_cli_refuses_out_around_the_input(hf_dir, tmp_path):
    # The CLI's path from that ValueError to one line and exit 2 is the same for all three cases above.
    work = _work_dir_with_input(hf_dir, tmp_path)
    before = _listing(work)
    r = _cli("convert", "--hf_dir", work / "hf", "--out", work, "--overwrite")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --out") and "input directory" in r.stderr
    assert _listing(work) == before


def test_overwrite_replaces_only_a_checkpoint(hf_dir, good_ckpt, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not a mixtral_jax checkpoint"):
        mj.convert_hf_checkpoint(hf_dir, precious, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    model = mj.load(good_ckpt, dtype="float32", layout="stacked")  # any model will do: no init_random compile
    with pytest.raises(FileExistsError, match="not a mixtral_jax checkpoint"):
        mj.save(model, precious, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["precious"]


def test_overwrite_keeps_the_old_checkpoint_until_the_new_one_is_complete(hf_dir, good_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, out)
    before = _listing(out)
    read = convert.HFCheckpoint.read

    def failing_read(self, tensor, rows=slice(None)):
        if tensor.startswith("model.layers.1."):
            raise OSError("disk full")
        return read(self, tensor, rows)

    monkeypatch.setattr(convert.HFCheckpoint, "read", failing_read)
    with pytest.raises(OSError, match="disk full"):
        mj.convert_hf_checkpoint(hf_dir, out, dtype="bfloat16", overwrite=True)
    assert _listing(out) == before and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_killed_conversion_is_cleaned_up_by_the_next(hf_dir, tmp_path):
    """kill -9 mid-conversion leaves a marked staging directory; the next run into the same place removes it."""
    out = tmp_path / "ckpt"
    slow = ("import time, sys\n"
            "from absl import app\n"
            "from mixtral_jax import convert\n"
            "read = convert.HFCheckpoint.read\n"
            "def slow_read(self, tensor, rows=slice(None)):\n"
            "    time.sleep(0.2)\n"
            "    return read(self, tensor, rows)\n"
            "convert.HFCheckpoint.read = slow_read\n"
            "convert._define_flags()\n"
            f"sys.argv = ['convert', '--hf_dir', {str(hf_dir)!r}, '--out', {str(out)!r}]\n"
            "app.run(convert.main)\n")
    proc = subprocess.Popen([sys.executable, "-c", slow], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        staging = []
        while time.time() < deadline and proc.poll() is None:
            staging = [n for n in os.listdir(tmp_path) if n.startswith("ckpt.tmp-")]
            if staging and os.path.isdir(tmp_path / staging[0] / "checkpoint" / "d"):
                break
            time.sleep(0.1)
        assert staging and proc.poll() is None, "the conversion should still be writing"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert os.listdir(tmp_path) == staging and not out.exists()
    # The next run, a plain CLI conversion: cleans up, reports progress on stderr only, honours --dtype.
    r = _cli("convert", "--hf_dir", hf_dir, "--out", out, "--dtype", "float32")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert "removing" in r.stderr and "interrupted" in r.stderr
    assert "layer 2/2 written:" in r.stderr and "GB/s" in r.stderr and "s left" in r.stderr
    assert "RuntimeWarning" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert json.load(open(out / "config.json"))["torch_dtype"] == "float32"
    mj.load(out)


def test_staging_of_a_running_writer_is_left_alone(tmp_path):
    out = str(tmp_path / "ckpt")
    live = ckpt_files._marked_dir(str(tmp_path), "ckpt.tmp-")  # this process: alive
    (tmp_path / "ckpt.tmp-notours").mkdir()  # no marker: not ours, never touched
    ckpt_files.clean_stale(out)
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(live), "ckpt.tmp-notours"])


# --- checkpoints are verified ----------------------------------------------------------------------

def _flip_byte(path, offset_fraction=0.5):
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(int(size * offset_fraction))
        b = f.read(1)
        f.seek(int(size * offset_fraction))
        f.write(bytes([b[0] ^ 0x01]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.fstat(f.fileno()).st_size // 2)


def _biggest_data_file(root):
    d = os.path.join(root, "d")
    return os.path.join("d", max(os.listdir(d), key=lambda n: os.path.getsize(os.path.join(d, n))))


KINDS = ["config.json", "_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt",
         os.path.join("array_metadatas", "process_0"), "data", "digests.json"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("kind", KINDS)
def test_any_damage_is_one_error_naming_the_file(kind, damage, good_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, ckpt)
    rel = _biggest_data_file(ckpt) if kind == "data" else kind
    {"flip": _flip_byte, "truncate": _truncate, "delete": os.remove}[damage](ckpt / rel)
    with pytest.raises(mj.CheckpointError) as e:
        mj.load(ckpt, dtype="float32")
    assert os.path.basename(rel) in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_a_flipped_data_byte_is_caught_that_orbax_alone_would_load(good_ckpt, tmp_path):
    """The damage the issue found: Orbax restores a flipped byte in a data file without a word."""
    ckpt = tmp_path / "ckpt"
    good = [np.asarray(a) for a in jax.tree.leaves(mj.load(good_ckpt, dtype="float32", layout="stacked").params())]
    rel = _biggest_data_file(good_ckpt)
    shutil.copytree(good_ckpt, ckpt)
    _flip_byte(ckpt / rel, 0.6)
    damaged = [np.asarray(a) for a in
               jax.tree.leaves(mj.load(ckpt, dtype="float32", layout="stacked", verify=False).params())]
    assert sum(not np.array_equal(a, b) for a, b in zip(good, damaged)) == 1  # loaded, silently wrong
    with pytest.raises(mj.CheckpointError, match=f"{os.path.basename(rel)} does not match its digest"):
        mj.load(ckpt, dtype="float32")


def test_unverified_load_of_a_damaged_checkpoint_is_still_one_sentence(good_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, ckpt)
    os.remove(ckpt / "manifest.ocdbt")
    with pytest.raises(mj.CheckpointError, match="could not be read .Orbax finds no index of its arrays"):
        mj.load(ckpt, dtype="float32", verify=False)
    shutil.rmtree(ckpt)
    shutil.copytree(good_ckpt, ckpt)
    os.remove(ckpt / _biggest_data_file(ckpt))
    # The file may hold the index's nodes as well as arrays' data (OCDBT keeps both in its data files).
    with pytest.raises(mj.CheckpointError,
                       match=r"could not be read \((array [\w.]+|Orbax finds no index of its arrays)\); it is damaged"):
        mj.load(ckpt, dtype="float32", verify=False)


def test_a_failed_restore_prints_nothing_after_its_error(good_ckpt, tmp_path):
    # Orbax abandons a failed restore's other reads; as they are collected, each would print a traceback
    # ("Exception ignored in <coroutine ...>", "Event loop is closed") after the one-sentence error.
    damaged = []
    for name in ("manifest.ocdbt", _biggest_data_file(good_ckpt)):  # no index of the arrays; an array's data
        damaged.append(str(tmp_path / f"ckpt{len(damaged)}"))
        shutil.copytree(good_ckpt, damaged[-1])
        os.remove(os.path.join(damaged[-1], name))
    code = ("import gc, time\nimport mixtral_jax as mj\n"
            f"for path in {damaged!r} * 3:\n"
            "    try: mj.load(path, dtype='float32', verify=False)\n"
            "    except mj.CheckpointError as e: print(e)\n"
            "gc.collect(); time.sleep(0.5)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("could not be read") == 6, r.stdout
    assert r.stderr == "", r.stderr[:3000]


def test_save_writes_digests_that_load_verifies(good_ckpt, tmp_path):
    model = mj.load(good_ckpt, dtype="float32", layout="stacked")
    path = mj.save(model, tmp_path / "ckpt")
    listing = json.load(open(os.path.join(path, ckpt_files.DIGESTS_FILE)))["files"]
    on_disk = {os.path.relpath(os.path.join(d, n), path) for d, _, ns in os.walk(path) for n in ns}
    assert set(listing) == on_disk - {ckpt_files.DIGESTS_FILE}
    _flip_byte(os.path.join(path, _biggest_data_file(path)))
    with pytest.raises(mj.CheckpointError, match="does not match its digest"):
        mj.load(path)


@pytest.mark.parametrize("cli", ["sample", "serve"])
def test_cli_without_verification_still_says_one_sentence(good_ckpt, tmp_path, cli):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, ckpt)
    os.remove(ckpt / "manifest.ocdbt")
    # The test checkpoint's 512 token ids hold no text prompt's (that would be said first): ids instead.
    rest = ["--max_new_tokens", "2", "--prompt_ids", "1,2,3"] if cli == "sample" else ["--max_seq_len", "64"]
    checked = _cli(cli, "--checkpoint", ckpt, *rest)  # the digests name the missing file
    assert checked.returncode == 2 and "manifest.ocdbt" in checked.stderr, checked.stderr
    r = _cli(cli, "--checkpoint", ckpt, "--noverify_checkpoint", *rest)  # Orbax's read fails instead
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("I")]  # absl's INFO lines
    assert lines == [f"error: checkpoint {ckpt} could not be read (Orbax finds no index of its arrays); it is "
                     "damaged or incomplete, convert or save it again."], r.stderr


@pytest.mark.parametrize("cli", ["sample", "serve"])
def test_cli_names_the_damaged_file(good_ckpt, tmp_path, cli):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, ckpt)
    rel = _biggest_data_file(ckpt)
    _flip_byte(ckpt / rel)
    rest = ["--max_new_tokens", "2", "--prompt_ids", "1,2,3"] if cli == "sample" else ["--max_seq_len", "64"]
    r = _cli(cli, "--checkpoint", ckpt, *rest)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error: checkpoint file")
    assert os.path.basename(rel) in r.stderr
