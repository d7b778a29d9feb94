"""Hostile and careless inputs: the command line and the Python API must never lose a file, fail
late, or answer with a traceback (issue 10).

Every CLI case runs in a small world (an input model, texts, a user's own files, a working folder)
whose whole tree is hashed before and after: nothing outside ``--out`` may change. Signals are
sent to real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fasp_ext import safety
from fasp_ext.cli import main
from fasp_ext.io import load_pruned, save_pruned
from fasp_ext.pipeline import PruneConfig, prune
from test_cli import WORDS, _tokenizer
from tiny_models import random_tokens, tiny_llama

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the world
def _words(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, WORDS, (n,), generator=g).tolist())


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "model"
    tiny_llama().save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


@pytest.fixture()
def world(tmp_path, tiny_model_dir, monkeypatch):
    """tmp/{model, texts/{calib,eval,short,binary}, home/notes.txt, mine/{a,b}, work/(cwd) notes.md}."""
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "model")
    t = tmp_path / "texts"
    t.mkdir()
    (t / "calib.txt").write_text(_words(3000, 0))
    (t / "eval.txt").write_text(_words(1000, 1))
    (t / "short.txt").write_text(_words(40, 2))
    (t / "medium.txt").write_text(_words(200, 3))
    g = torch.Generator().manual_seed(6)  # a third of the bytes not UTF-8 (latin-1 accents), no NUL
    high = bytes((torch.randint(0x80, 0x100, (6000,), generator=g)).to(torch.uint8).tolist())
    (t / "latin.txt").write_bytes(b"".join(w.encode() + b" " + high[i:i + 2] for i, w in
                                           enumerate(_words(3000, 7).split())))
    (t / "binary.txt").write_bytes(bytes(torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(4))
                                         .to(torch.uint8).tolist()) + b" " + _words(3000, 5).encode())
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("my notes")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("precious")
    (mine / "b.bin").write_bytes(b"\x00\x01")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text("# work")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return tmp_path


def _file_hash(p: Path) -> str:
    """The file's content hash; FIFOs and devices by their kind (reading them would block or never
    end), files over 64 MiB (the sparse 5 GB text) by size, mtime and their first and last MiB."""
    import stat

    st = p.lstat()
    if not stat.S_ISREG(st.st_mode):
        return f"special {stat.filemode(st.st_mode)}"
    if st.st_size > 64 << 20:
        with open(p, "rb") as f:
            head = f.read(1 << 20)
            f.seek(-(1 << 20), os.SEEK_END)
            tail = f.read()
        return f"{st.st_size} {st.st_mtime_ns} " + hashlib.sha256(head + tail).hexdigest()
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree_hash(root: Path, skip: Path | None = None) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if skip is not None and (d == skip or skip in d.parents):
            continue
        for name in dirnames:
            if skip is not None and d / name == skip:
                continue
            out[str((d / name).relative_to(root)) + "/"] = "dir"
        for name in filenames:
            p = d / name
            if skip is not None and p == skip:
                continue
            out[str(p.relative_to(root))] = _file_hash(p)
    return out


def prune_args(world: Path, out, *extra, calib="texts/calib.txt"):
    return ["prune", "--model", str(world / "model"), "--calib", str(world / calib), "--nsamples", "2",
            "--seqlen", "16", "--out", str(out), "--quiet", *extra]


def run_cli(world: Path, args, capsys, out: Path | None = None) -> tuple[int, str, str]:
    """Run main(args); assert that nothing outside ``out`` changed; return (rc, stdout, stderr)."""
    before = tree_hash(world, skip=out)
    rc = main([str(a) for a in args])
    o, e = capsys.readouterr()
    after = tree_hash(world, skip=out)
    assert after == before, f"files outside --out changed: {set(after.items()) ^ set(before.items())}"
    assert "Traceback" not in e
    return rc, o, e


def make_previous_output(world: Path, capsys, name="prev", *extra) -> Path:
    """A pruned output with non-uniform per-block sizes (the per-structure error curves move value
    channels between blocks), so its config carries the fasp_ext section."""
    out = world / name
    assert main([str(a) for a in prune_args(world, out, "--sparsity", "0.25", "--allocation", "error", *extra)]) == 0
    capsys.readouterr()
    return out


# ----------------------------------------------------------------------------- --out and --overwrite
@pytest.mark.parametrize("target, message", [
    ("", "empty path"),
    ("   ", "empty path"),
    (".", "current folder"),
    ("..", "current folder or a folder above it"),
    ("HOME", "home folder"),
    ("/", "root folder"),
    ("model", "holds the input"),
    ("texts", "holds the input"),
    ("WORLD", "current folder or a folder above it"),
    ("mine", "not a fasp_ext output"),
])
def test_overwrite_never_replaces_a_folder_it_did_not_write(world, capsys, target, message):
    out = {"HOME": str(world / "home"), "WORLD": str(world), "model": str(world / "model"),
           "texts": str(world / "texts"), "mine": str(world / "mine")}.get(target, target)
    rc, _, err = run_cli(world, prune_args(world, out, "--overwrite"), capsys)
    assert rc == 2 and message in err and err.startswith("fasp-ext: error:")
    assert len(err.strip().splitlines()) == 1


def test_overwrite_refuses_a_previous_output_with_a_users_file_added(world, capsys):
    prev = make_previous_output(world, capsys)
    (prev / "my_eval_notes.txt").write_text("do not lose me")
    rc, _, err = run_cli(world, prune_args(world, prev, "--overwrite"), capsys)
    assert rc == 2 and "my_eval_notes.txt" in err
    assert (prev / "my_eval_notes.txt").read_text() == "do not lose me"


def test_overwrite_replaces_a_previous_output_and_leaves_no_trace(world, capsys):
    prev = make_previous_output(world, capsys)
    old_report = json.loads((prev / "fasp_report.json").read_text())
    rc, _, _ = run_cli(world, prune_args(world, prev, "--overwrite", "--sparsity", "0.5"), capsys, out=prev)
    assert rc == 0
    new_report = json.loads((prev / "fasp_report.json").read_text())
    assert new_report["sparsity"] == 0.5 and old_report["sparsity"] == 0.25
    assert sorted(p.name for p in world.iterdir() if p.name.startswith(".")) == []
    listed = json.loads((prev / safety.MARKER).read_text())["files"]
    assert set(listed) | {safety.MARKER} == {p.name for p in prev.iterdir()}


def test_overwrite_accepts_an_output_of_an_earlier_version_without_marker(world, capsys):
    prev = make_previous_output(world, capsys)
    (prev / safety.MARKER).unlink()
    rc, _, _ = run_cli(world, prune_args(world, prev, "--overwrite"), capsys, out=prev)
    assert rc == 0 and (prev / safety.MARKER).is_file()


def test_existing_output_without_overwrite(world, capsys):
    prev = make_previous_output(world, capsys)
    rc, _, err = run_cli(world, prune_args(world, prev), capsys)
    assert rc == 2 and "already exists" in err


def test_out_is_a_file(world, capsys):
    rc, _, err = run_cli(world, prune_args(world, world / "mine" / "a.txt", "--overwrite"), capsys)
    assert rc == 2 and "not a folder" in err


def test_out_below_a_file(world, capsys):
    rc, _, err = run_cli(world, prune_args(world, world / "mine" / "a.txt" / "sub"), capsys)
    assert rc == 2 and "not a folder" in err


def test_out_is_a_symlink(world, capsys):
    (world / "link").symlink_to(world / "mine")
    rc, _, err = run_cli(world, prune_args(world, world / "link", "--overwrite"), capsys)
    assert rc == 2 and "symbolic link" in err


def test_out_not_writable(world, capsys):
    rc, _, err = run_cli(world, prune_args(world, "/sys/fasp_ext_out"), capsys)
    assert rc == 2 and "--out" in err and "cannot write" in err


def test_not_enough_disk_space_is_found_before_loading(world, capsys, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    monkeypatch.setattr("fasp_ext.models.load_model", _must_not_load)
    rc, _, err = run_cli(world, prune_args(world, world / "o"), capsys)
    assert rc == 2 and "free" in err and not (world / "o").exists()


@pytest.mark.parametrize("loading", ["--lazy", "--no-lazy"])
def test_a_full_disk_while_saving_keeps_the_previous_output(world, capsys, monkeypatch, loading):
    import errno

    import safetensors.torch
    from transformers import PreTrainedModel

    prev = make_previous_output(world, capsys)
    before = tree_hash(prev)

    def full(path):
        Path(path).write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    # the in-memory path saves with save_pretrained, the block-by-block one shard by shard
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, path, **kw: full(Path(path) / "model.safetensors"))
    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, **kw: full(path))
    rc, _, err = run_cli(world, prune_args(world, prev, "--overwrite", loading), capsys)
    assert rc == 2 and "No space left on device" in err
    assert tree_hash(prev) == before
    assert [p.name for p in world.iterdir() if p.name.startswith(".")] == []


def test_output_folder_gets_ordinary_permissions(world, capsys):
    out = world / "o"
    rc, _, _ = run_cli(world, prune_args(world, out), capsys, out=out)
    assert rc == 0
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~mask


# ----------------------------------------------------------------------------- fail early
def _must_not_load(*a, **k):
    raise AssertionError("the model was loaded before the inputs were checked")


@pytest.mark.parametrize("device, message", [("cuda", "--device cuda"), ("tpu", "--device"), ("cuda:7", "--device")])
def test_bad_device_fails_before_loading(world, capsys, monkeypatch, device, message):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr("fasp_ext.models.load_model", _must_not_load)
    rc, _, err = run_cli(world, prune_args(world, world / "o", "--device", device), capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def _break_model(world: Path, how: str) -> None:
    m = world / "model"
    st = m / "model.safetensors"
    if how == "no-config":
        (m / "config.json").unlink()
    elif how == "bad-config":
        (m / "config.json").write_text("{not json")
    elif how == "unsupported":
        cfg = json.loads((m / "config.json").read_text())
        cfg["model_type"] = "bert"
        (m / "config.json").write_text(json.dumps(cfg))
    elif how == "pickle-only":
        st.rename(m / "pytorch_model.bin")
    elif how == "truncated":
        st.write_bytes(st.read_bytes()[:-100])
    elif how == "garbage":
        st.write_bytes(b"\xff" * 64)
    elif how == "no-weights":
        st.unlink()
    elif how == "missing-shard":
        st.rename(m / "model-00001-of-00002.safetensors")
        (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    elif how == "escaping-shard":
        (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../mine/b.bin"}}))
    elif how == "bad-dtype":
        import struct

        raw = st.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = raw[8:8 + n].replace(b'"F32"', b'"Q32"', 1)
        st.write_bytes(raw[:8] + header + raw[8 + n:])


@pytest.mark.parametrize("how, message", [
    ("no-config", "no config.json"),
    ("bad-config", "not valid JSON"),
    ("unsupported", "unsupported architecture 'bert'"),
    ("pickle-only", "safetensors only"),
    ("truncated", "truncated or corrupt"),
    ("garbage", "corrupt"),
    ("no-weights", "no model.safetensors"),
    ("missing-shard", "missing"),
    ("escaping-shard", "invalid shard"),
    ("bad-dtype", "unsupported dtype"),
])
def test_bad_model_folder_fails_before_loading(world, capsys, monkeypatch, how, message):
    _break_model(world, how)
    monkeypatch.setattr("fasp_ext.models.load_model", _must_not_load)
    rc, _, err = run_cli(world, prune_args(world, world / "o"), capsys)
    assert rc == 2 and message in err and "--model" in err
    assert not (world / "o").exists()


def test_seqlen_beyond_the_context_fails_before_loading(world, capsys, monkeypatch):
    monkeypatch.setattr("fasp_ext.models.load_model", _must_not_load)
    rc, _, err = run_cli(world, prune_args(world, world / "o") + ["--seqlen", "4096"], capsys)
    assert rc == 2 and "--seqlen" in err


@pytest.mark.parametrize("extra, message", [
    (["--nsamples", "100000000"], "--nsamples"),
    (["--eval", "texts/eval.txt", "--eval-windows", "0"], "--eval-windows"),
    (["--batch-size", "0"], "batch_size"),
    (["--sparsity", "nan"], "sparsity"),
])
def test_absurd_sizes_fail_before_loading(world, capsys, monkeypatch, extra, message):
    monkeypatch.setattr("fasp_ext.models.load_model", _must_not_load)
    rc, _, err = run_cli(world, prune_args(world, world / "o") + extra, capsys)
    assert rc == 2 and message in err


def test_missing_calibration_file_fails_before_loading(world, capsys, monkeypatch):
    monkeypatch.setattr("fasp_ext.models.load_model", _must_not_load)
    rc, _, err = run_cli(world, prune_args(world, world / "o", calib="texts/nope.txt"), capsys)
    assert rc == 2 and "nope.txt" in err


# ----------------------------------------------------------------------------- calibration sanity
def test_calibration_text_shorter_than_a_window_is_refused(world, capsys):
    rc, _, err = run_cli(world, prune_args(world, world / "o", "--seqlen", "64", calib="texts/short.txt"), capsys)
    assert rc == 2 and "--calib" in err and "need at least seqlen+1 = 65" in err


def test_heavily_overlapping_windows_warn_and_are_reported(world, capsys):
    out = world / "o"
    args = prune_args(world, out, calib="texts/medium.txt")
    args[args.index("--nsamples") + 1] = "32"
    rc, _, err = run_cli(world, args, capsys, out=out)
    assert rc == 0 and "overlap heavily" in err
    info = json.loads((out / "fasp_report.json").read_text())["calibration"]
    assert info["text_tokens"] == 200 and info["requested_tokens"] == 32 * 16
    assert info["unique_positions"] <= 200 and info["coverage"] < 0.5


def test_partly_undecodable_calibration_warns_and_is_reported(world, capsys):
    out = world / "o"
    rc, _, err = run_cli(world, prune_args(world, out, calib="texts/latin.txt"), capsys, out=out)
    assert rc == 0 and "undecodable" in err
    assert json.loads((out / "fasp_report.json").read_text())["calibration"]["undecodable_fraction"] > 0.2


def test_clean_calibration_reports_full_coverage(world, capsys):
    out = world / "o"
    rc, _, err = run_cli(world, prune_args(world, out), capsys, out=out)
    assert rc == 0 and "overlap" not in err and "undecodable" not in err
    info = json.loads((out / "fasp_report.json").read_text())["calibration"]
    assert info["undecodable_fraction"] == 0.0 and info["coverage"] > 0.5


@pytest.mark.parametrize("bad", [-1, WORDS + 7])
def test_api_rejects_token_ids_outside_the_vocabulary(bad):
    m = tiny_llama()
    toks = random_tokens(2, 8)
    toks[1, 3] = bad
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"calibration: token ids must lie in \[0, 97\)"):
        prune(m, toks, PruneConfig(progress=False))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_api_rejects_a_float_calibration_tensor():
    with pytest.raises(ValueError, match="calibration"):
        prune(tiny_llama(), torch.rand(2, 8), PruneConfig(progress=False))


# ----------------------------------------------------------------------------- other commands
def test_eval_json_never_overwrites_a_users_file(world, capsys):
    target = world / "mine" / "a.txt"
    args = ["eval", "--model", world / "model", "--data", world / "texts/eval.txt", "--seqlen", "16",
            "--eval-windows", "2", "--quiet", "--json", target]
    rc, _, err = run_cli(world, args, capsys)
    assert rc == 2 and "--json" in err and "already exists" in err


def test_compare_never_overwrites_foreign_results(world, capsys):
    (world / "mine" / "compare.json").write_text('{"mine": 1}')
    args = ["compare", "--model", world / "model", "--calib", world / "texts/calib.txt", "--eval",
            world / "texts/eval.txt", "--out", world / "mine", "--quiet"]
    rc, _, err = run_cli(world, args, capsys)
    assert rc == 2 and "not a fasp-ext compare result" in err


def test_usage_errors_are_one_line_with_exit_2(world, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--model", str(world / "model")])
    assert e.value.code == 2
    assert "fasp-ext: error:" in capsys.readouterr().err


def test_debug_shows_the_traceback(world, capsys):
    _break_model(world, "bad-config")
    assert main([str(a) for a in prune_args(world, world / "o", "--debug")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "fasp-ext: error:" in err


# ----------------------------------------------------------------------------- stale temporaries
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_folder_of_a_killed_run_is_removed(world, capsys):
    out = world / "o"
    stale = world / f".o.fasp-tmp-{_dead_pid()}-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = world / f".o.fasp-tmp-{os.getppid()}-abcd1234"  # a live process's: left alone
    live.mkdir()
    assert main([str(a) for a in prune_args(world, out)]) == 0
    assert "removed .o.fasp-tmp-" in capsys.readouterr().err
    assert not stale.exists() and live.exists() and (out / "config.json").is_file()


def test_previous_output_moved_aside_by_a_killed_run_is_put_back(world, capsys):
    prev = make_previous_output(world, capsys, name="o")
    aside = world / f".o.fasp-old-{_dead_pid()}-abcd1234"
    prev.rename(aside)
    before = tree_hash(aside)
    rc = main([str(a) for a in prune_args(world, world / "o")])  # no --overwrite: the result is back
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert not aside.exists() and tree_hash(world / "o") == before


# ----------------------------------------------------------------------------- signals (real processes)
_DRIVER = textwrap.dedent("""
    import sys, time
    import fasp_ext.pipeline, fasp_ext.cli
    from transformers import PreTrainedModel
    phase = sys.argv[1]
    real_prune, real_save = fasp_ext.pipeline.prune, PreTrainedModel.save_pretrained
    def prune(*a, **k):
        if phase == "prune":
            print("PHASE", flush=True); time.sleep(60)
        if phase == "destructor":
            import os, signal
            class Bomb:
                def __del__(self):
                    os.kill(os.getpid(), signal.SIGINT)
            b = Bomb(); del b
        return real_prune(*a, **k)
    def save(self, *a, **k):
        real_save(self, *a, **k)
        if phase == "save":
            print("PHASE", flush=True); time.sleep(60)
    import fasp_ext.lazy
    real_finish = fasp_ext.lazy.ShardWriter.finish
    def finish(self):  # block by block (the default): the shards are written, the folder not yet published
        real_finish(self)
        if phase == "save":
            print("PHASE", flush=True); time.sleep(60)
    fasp_ext.pipeline.prune = prune
    PreTrainedModel.save_pretrained = save
    fasp_ext.lazy.ShardWriter.finish = finish
    sys.exit(fasp_ext.cli.main(sys.argv[2:]))
""")


def _spawn(world: Path, phase: str, args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", _DRIVER, phase, *map(str, args)], cwd=world / "work", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_phase(p: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        line = p.stdout.readline()
        if line.startswith("PHASE"):
            return
        if p.poll() is not None:
            raise AssertionError(f"exited early: {p.returncode} {p.stderr.read()}")
    p.kill()
    raise AssertionError("never reached the phase")


@pytest.mark.parametrize("phase", ["prune", "save"])
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_end_the_run_cleanly(world, capsys, phase, sig, code):
    prev = make_previous_output(world, capsys, name="o")
    before_prev = tree_hash(prev)
    before = tree_hash(world, skip=prev)
    p = _spawn(world, phase, prune_args(world, prev, "--overwrite", "--sparsity", "0.5"))
    _wait_for_phase(p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert "interrupted by SIG" in err and "Traceback" not in err
    assert tree_hash(prev) == before_prev  # the previous result is untouched
    assert tree_hash(world, skip=prev) == before  # and no temporary folder is left
    assert [q.name for q in world.iterdir() if q.name.startswith(".")] == []


def test_sigkill_during_save_is_cleaned_up_by_the_next_run(world, capsys):
    out = world / "o"
    p = _spawn(world, "save", prune_args(world, out))
    _wait_for_phase(p)
    p.kill()
    p.communicate(timeout=60)
    stale = [q for q in world.iterdir() if q.name.startswith(".o.fasp-tmp-")]
    assert len(stale) == 1 and not out.exists()
    assert main([str(a) for a in prune_args(world, out)]) == 0
    assert "left by a killed run" in capsys.readouterr().err
    assert not stale[0].exists() and (out / "config.json").is_file()


def test_a_sigint_swallowed_by_a_destructor_is_not_lost(world):
    out = world / "o"
    p = _spawn(world, "destructor", prune_args(world, out))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert not out.exists() and [q.name for q in world.iterdir() if q.name.startswith(".")] == []


# ----------------------------------------------------------------------------- strict loading
@pytest.fixture()
def pruned_dir(world, capsys):
    """One model.safetensors (the in-memory path writes one file; the default writes shards)."""
    return make_previous_output(world, capsys, "pruned", "--no-lazy")


def _logits(m):
    return m(random_tokens(1, 8)).logits


def test_load_ignores_stray_weight_files(pruned_dir):
    ref = _logits(load_pruned(pruned_dir))
    from safetensors.torch import save_file

    state = load_pruned(pruned_dir).state_dict()
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(pruned_dir / "zz-stray.safetensors"))
    assert torch.equal(_logits(load_pruned(pruned_dir)), ref)


def _shard(pruned_dir: Path, dup: bool = False, drop: str | None = None, extra: bool = False) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(pruned_dir / "model.safetensors"))
    (pruned_dir / "model.safetensors").unlink()
    keys = sorted(state)
    if drop:
        keys.remove(drop)
    a, b = keys[: len(keys) // 2], keys[len(keys) // 2:]
    part_b = {k: state[k] for k in b}
    if dup:
        part_b[a[0]] = state[a[0]]
    if extra:
        part_b["model.layers.0.mlp.surprise"] = torch.zeros(3)
    save_file({k: state[k] for k in a}, str(pruned_dir / "model-1.safetensors"))
    save_file(part_b, str(pruned_dir / "model-2.safetensors"))
    wmap = {k: "model-1.safetensors" for k in a} | {k: "model-2.safetensors" for k in part_b}
    (pruned_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))


def test_load_sharded_checkpoint_matches(pruned_dir):
    ref = _logits(load_pruned(pruned_dir))
    _shard(pruned_dir)
    assert torch.equal(_logits(load_pruned(pruned_dir)), ref)


@pytest.mark.parametrize("kw, message", [
    ({"dup": True}, "stored twice"),
    ({"drop": "model.layers.1.mlp.down_proj.weight"}, "missing ['model.layers.1.mlp.down_proj.weight']"),
    ({"extra": True}, "unexpected ['model.layers.0.mlp.surprise']"),
])
def test_load_names_bad_tensors(pruned_dir, kw, message):
    _shard(pruned_dir, **kw)
    with pytest.raises(ValueError) as e:
        load_pruned(pruned_dir)
    assert message in str(e.value)


def _edit_meta(pruned_dir: Path, fn) -> None:
    cfg = json.loads((pruned_dir / "config.json").read_text())
    fn(cfg)
    (pruned_dir / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["fasp_ext"].__setitem__("v_head_dim", [12.5, 12]), "integers"),
    (lambda c: c["fasp_ext"].__setitem__("v_head_dim", ["12", 12]), "integers"),
    (lambda c: c["fasp_ext"].__setitem__("v_head_dim", [True, 12]), "integers"),
    (lambda c: c["fasp_ext"].__setitem__("mlp_width", [72]), "2 blocks"),
    (lambda c: c["fasp_ext"].__setitem__("mlp_width", [10**12, 72]), "outside"),
    (lambda c: c["fasp_ext"].__setitem__("v_head_dim", [0, 12]), "outside"),
    (lambda c: c["fasp_ext"].pop("mlp_width"), "mlp_width"),
    (lambda c: c.__setitem__("fasp_ext", "yes"), "must be an object"),
    (lambda c: c["fasp_ext"].__setitem__("added_bias", ["model.norm"]), "not a linear layer"),
    (lambda c: c["fasp_ext"].__setitem__("v_head_dim", [8, 12]), "the config gives"),
])
def test_load_validates_the_metadata_before_allocating(pruned_dir, edit, message):
    _edit_meta(pruned_dir, edit)
    with pytest.raises(ValueError) as e:
        load_pruned(pruned_dir)
    assert message in str(e.value)


def test_load_keeps_the_saved_dtype(tmp_path):
    m = tiny_llama()
    prune(m, random_tokens(2, 16), PruneConfig(sparsity=0.25, allocation="error", progress=False))
    m.to(torch.bfloat16)
    out = save_pruned(m, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text()).get("fasp_ext")
    assert load_pruned(out).dtype == torch.bfloat16
    assert load_pruned(out, dtype=torch.float32).dtype == torch.float32


def test_save_api_refuses_the_models_own_folder(world):
    from fasp_ext.io import load_model_and_tokenizer

    m, _ = load_model_and_tokenizer(str(world / "model"))
    before = tree_hash(world)
    with pytest.raises(ValueError, match="holds the input"):
        save_pruned(m, world / "model", overwrite=True)
    with pytest.raises(ValueError, match="current folder"):
        save_pruned(m, ".", overwrite=True)
    assert tree_hash(world) == before


# ----------------------------------------------------------------------------- determinism
def test_same_seed_and_threads_give_bitwise_identical_output(world, capsys):
    outs = []
    for name in ("r1", "r2"):
        out = world / name
        assert main([str(a) for a in prune_args(world, out, "--seed", "3")]) == 0
        outs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))})
    assert len(outs[0]) >= 1
    capsys.readouterr()
    assert outs[0] == outs[1]


def test_model_cache_never_replaces_a_users_folder(tmp_path, monkeypatch):
    """FASP_EXT_MODEL_DIR may name any folder: a conversion that finds it taken must not delete it."""
    from fasp_ext import models

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")

    def fake_load():
        return tiny_llama(), _tokenizer()

    with pytest.raises(RuntimeError, match="exists and is not a converted model"):
        models._convert(fake_load, mine)
    assert (mine / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# ----------------------------------------------------------------------------- bounded inputs (issue 27)
def _no_tokenising(*a, **k):
    raise AssertionError("a text that must be refused was tokenised")


class _Alarm:
    """Fail a test that blocks (opening a FIFO would wait for a writer forever) instead of hanging."""

    def __init__(self, seconds: int = 60):
        self.seconds = seconds

    def __enter__(self):
        def ring(signum, frame):
            raise AssertionError(f"blocked for {self.seconds} s")

        self.old = signal.signal(signal.SIGALRM, ring)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


@pytest.mark.parametrize("where", ["--calib", "--eval"])
@pytest.mark.parametrize("what", ["/dev/zero", "fifo", "binary-file", "folder-of-fifos"])
def test_non_text_inputs_are_refused_in_one_line_before_loading(world, capsys, monkeypatch, where, what):
    """/dev/zero grew to 23 GB and a model.safetensors as --calib to 21.6 GB before this: now
    one line naming the argument, exit 2, before the model or the tokenizer is touched."""
    monkeypatch.setattr("fasp_ext.models.load_model", _must_not_load)
    monkeypatch.setattr("fasp_ext.data.tokenize_text", _no_tokenising)
    path = {"/dev/zero": "/dev/zero", "binary-file": str(world / "model" / "model.safetensors")}.get(what)
    if what == "fifo":
        path = str(world / "texts" / "pipe.txt")
        os.mkfifo(path)
    if what == "folder-of-fifos":  # a folder's .txt entries that are not regular files are skipped
        (world / "texts" / "pipes").mkdir()
        os.mkfifo(world / "texts" / "pipes" / "a.txt")
        path = str(world / "texts" / "pipes")
    args = prune_args(world, world / "o") if where == "--eval" else prune_args(world, world / "o", calib=path)
    if where == "--eval":
        args += ["--eval", path]
    with _Alarm():
        t0 = time.perf_counter()
        rc, _, err = run_cli(world, args, capsys)
    assert rc == 2 and where in err and len(err.strip().splitlines()) == 1, err
    expect = {"/dev/zero": "character device", "fifo": "FIFO", "binary-file": "NUL byte",
              "folder-of-fifos": "no .txt files"}[what]
    assert expect in err
    assert not (world / "o").exists()


def test_eval_data_on_a_fifo_is_refused(world, capsys, monkeypatch):
    monkeypatch.setattr("fasp_ext.models.load_model", _must_not_load)
    os.mkfifo(world / "texts" / "pipe.txt")
    with _Alarm():
        rc, _, err = run_cli(world, ["eval", "--model", str(world / "model"), "--data",
                                     str(world / "texts" / "pipe.txt"), "--quiet"], capsys)
    assert rc == 2 and "--data" in err and "FIFO" in err


def test_mostly_undecodable_text_is_refused_before_tokenising(world, capsys, monkeypatch):
    monkeypatch.setattr("fasp_ext.data.tokenize_text", _no_tokenising)
    (world / "texts" / "noise.txt").write_bytes(bytes(range(0x80, 0x100)) * 400)  # no NUL, not UTF-8
    rc, _, err = run_cli(world, prune_args(world, world / "o", calib="texts/noise.txt"), capsys)
    assert rc == 2 and "--calib" in err and "not text" in err


def test_a_huge_text_is_read_only_as_far_as_the_run_needs(world, capsys, monkeypatch):
    """A 5 GB file (sparse: text at the start, then holes) calibrates and evaluates, reading a
    bounded prefix: the windows come from the first calibration_char_budget characters."""
    from fasp_ext import data

    big = world / "texts" / "big.txt"
    text = _words(400_000, 8)  # about 2.4 MB of text, more than the 1 Mi-character minimum budget
    with open(big, "wb") as f:
        f.write(text.encode())
        f.truncate(5 << 30)  # the rest reads as NUL bytes (beyond the first megabyte sniffed)
    read = []
    real = data._read_file
    monkeypatch.setattr(data, "_read_file", lambda p, n, info: read.append(n) or real(p, n, info))
    out = world / "o"
    args = prune_args(world, out, calib="texts/big.txt") + ["--eval", str(big), "--eval-windows", "4"]
    rc, _, err = run_cli(world, args, capsys, out=out)
    assert rc == 0, err
    assert read == [data.calibration_char_budget(2, 16), data.eval_char_budget(16, 4)] == [1 << 20, 1 << 20]
    rep = json.loads((out / "fasp_report.json").read_text())
    budget_tokens = len(text[: 1 << 20].split())  # one token a word with this tokenizer
    assert rep["calibration"]["text_tokens"] == budget_tokens
    assert rep["eval_windows"] == {str(big): 4}


def test_load_text_stops_at_max_chars_and_says_so(tmp_path):
    from fasp_ext.data import load_text

    (tmp_path / "a.txt").write_text("abc " * 1000)
    (tmp_path / "b.txt").write_text("xyz " * 1000)
    info: dict = {}
    assert load_text(str(tmp_path / "a.txt"), max_chars=10, info=info) == "abc abc ab" and info["truncated"]
    info = {}
    assert len(load_text(str(tmp_path / "a.txt"), max_chars=4000, info=info)) == 4000 and "truncated" not in info
    info = {}
    both = load_text(str(tmp_path), max_chars=4010, info=info)  # a folder: the budget spans its files
    assert both == "abc " * 1000 + "\n\n" + "xyz " * 2 and info["truncated"]
    info = {}
    listed = load_text(f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", max_chars=4003, info=info)
    assert listed == "abc " * 1000 + "\n\n" + "x" and info["truncated"]
    assert load_text(str(tmp_path / "a.txt")) == "abc " * 1000  # no budget: all of it


# ----------------------------------------------------------------------------- dtype and config (issue 27)
@pytest.fixture()
def bf16_world(world):
    """The world's model stored in bfloat16, as current checkpoints ship."""
    import shutil

    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(world / "model", dtype=torch.bfloat16)
    shutil.rmtree(world / "model")
    m.save_pretrained(world / "model")
    _tokenizer().save_pretrained(world / "model")
    return world


def _stored_dtypes(folder: Path) -> set[str]:
    out = set()
    for f in folder.glob("*.safetensors"):
        out |= {t["dtype"] for t in safety.safetensors_header(f).values()}
    return out


@pytest.mark.parametrize("loading", ["--lazy", "--no-lazy"])
def test_a_bf16_checkpoint_stays_bf16_and_no_larger(bf16_world, capsys, loading):
    world = bf16_world
    out = world / "o"
    rc, o, err = run_cli(world, prune_args(world, out, loading), capsys, out=out)
    assert rc == 0, err
    assert _stored_dtypes(world / "model") == _stored_dtypes(out) == {"BF16"}
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(out) <= size(world / "model")
    assert json.loads((out / "fasp_report.json").read_text())["dtype"] == "bfloat16"
    assert "bfloat16" in (out / "README.md").read_text() and "in bfloat16" in o
    assert load_pruned(out).dtype == torch.bfloat16


def test_an_explicit_dtype_still_wins(bf16_world, capsys):
    world = bf16_world
    out = world / "o"
    rc, _, err = run_cli(world, prune_args(world, out, "--dtype", "float32"), capsys, out=out)
    assert rc == 0, err
    assert _stored_dtypes(out) == {"F32"}


def test_checkpoint_dtype_reads_the_config_then_the_headers(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    save_file({"a": torch.zeros(2, dtype=torch.float16), "b": torch.zeros(2, dtype=torch.float16)},
              str(tmp_path / "model.safetensors"))
    assert safety.checkpoint_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    assert safety.checkpoint_dtype(tmp_path) == "float32"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert safety.checkpoint_dtype(tmp_path) == "float16"  # no dtype in the config: the headers


@pytest.mark.parametrize("cmd", ["prune", "eval"])
def test_a_config_that_disagrees_with_the_weights_fails_in_one_line_first(world, capsys, monkeypatch, cmd):
    cfg = json.loads((world / "model" / "config.json").read_text())
    cfg["intermediate_size"] += 64
    (world / "model" / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("fasp_ext.models.load_model", _must_not_load)
    monkeypatch.setattr("fasp_ext.data.tokenize_text", _must_not_load)  # before anything is tokenised
    args = prune_args(world, world / "o") if cmd == "prune" else \
        ["eval", "--model", str(world / "model"), "--data", str(world / "texts" / "eval.txt")]
    rc, _, err = run_cli(world, args, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    w = cfg["intermediate_size"]
    assert "--model" in err and "model.layers.0.mlp.gate_proj.weight" in err
    assert f"[{w - 64}, " in err and f"[{w}, " in err and "more tensors" in err
    assert "ignore_mismatched_sizes" not in err and not (world / "o").exists()


@pytest.mark.parametrize("loading", ["--lazy", "--no-lazy"])
def test_quiet_silences_every_progress_bar(world, capsys, loading):
    out = world / "o"
    args = prune_args(world, out, loading) + ["--eval", str(world / "texts" / "eval.txt"), "--eval-windows", "2"]
    rc, _, err = run_cli(world, [a for a in args if a != "--quiet"], capsys, out=out)
    assert rc == 0 and ("it/s]" in err or "win/s]" in err)  # without --quiet there are bars
    import shutil

    shutil.rmtree(out)
    rc, o, err = run_cli(world, args, capsys, out=out)
    assert rc == 0 and err == "", err
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # restored for the rest of the process


# ----------------------------------------------------------------------------- what held (issue 27)
def test_a_read_only_model_folder_is_pruned_and_left_alone(world, capsys):
    model = world / "model"
    modes = {p: p.stat().st_mode for p in [model, *model.iterdir()]}
    try:
        for p in [*model.iterdir(), model]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        out = world / "o"
        rc, _, err = run_cli(world, prune_args(world, out), capsys, out=out)
        assert rc == 0, err
    finally:
        for p, m in modes.items():
            p.chmod(m)
    assert (out / "config.json").is_file()


def test_two_runs_racing_into_the_same_out(world, capsys):
    """Two processes publish into one --out: one wins, the other fails in one line, the result is
    whole (it reloads) and no temporary folder is left."""
    out = world / "o"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-m", "fasp_ext", *map(str, prune_args(world, out, "--seed", str(i)))],
                              cwd=world / "work", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 2], [0, 0]), results
    for rc, err in results:
        assert "Traceback" not in err and (rc == 0 or "already exists" in err), err
    load_pruned(out)
    assert [q.name for q in world.iterdir() if q.name.startswith(".")] == []


def test_an_absurd_batch_size_is_clamped_or_refused(world, capsys):
    out = world / "o"
    rc, _, err = run_cli(world, prune_args(world, out, "--batch-size", str(10**9)), capsys, out=out)
    assert rc == 0 and (out / "config.json").is_file(), err


def test_nan_in_a_weight_fails_in_one_line_and_writes_nothing(world, capsys):
    from safetensors.torch import load_file, save_file

    st = world / "model" / "model.safetensors"
    state = load_file(str(st))
    state["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(st), metadata={"format": "pt"})
    rc, _, err = run_cli(world, prune_args(world, world / "o"), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and ("NaN" in err or "finite" in err), err
    assert not (world / "o").exists()


def test_95_percent_sparsity_prunes_and_reloads(world, capsys):
    out = world / "o"
    rc, _, err = run_cli(world, prune_args(world, out, "--sparsity", "0.95"), capsys, out=out)
    assert rc == 0, err
    m = load_pruned(out)
    assert torch.isfinite(m(random_tokens(1, 8)).logits).all()


def test_paths_with_spaces_and_accents(world, capsys):
    import shutil

    shutil.copytree(world / "model", world / "mod èl ü")
    shutil.copy(world / "texts" / "calib.txt", world / "texts" / "café crème.txt")
    out = world / "sortie été"
    args = ["prune", "--model", str(world / "mod èl ü"), "--calib", str(world / "texts" / "café crème.txt"),
            "--nsamples", "2", "--seqlen", "16", "--out", str(out), "--quiet"]
    rc, _, err = run_cli(world, args, capsys, out=out)
    assert rc == 0, err
    load_pruned(out)


def test_load_pruned_refuses_a_config_announcing_huge_widths(pruned_dir):
    cfg = json.loads((pruned_dir / "config.json").read_text())
    cfg["fasp_ext"]["mlp_width"] = [2**40] * len(cfg["fasp_ext"]["mlp_width"])
    (pruned_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="outside"):
        load_pruned(pruned_dir)


def test_python_load_model_keeps_the_checkpoints_dtype(bf16_world):
    from fasp_ext import models

    assert models.load_model(str(bf16_world / "model"))[0].dtype == torch.bfloat16
    assert models.load_model(str(bf16_world / "model"), dtype=torch.float32)[0].dtype == torch.float32


def test_a_quantised_checkpoint_is_refused_by_prune(world, capsys, monkeypatch):
    cfg = json.loads((world / "model" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (world / "model" / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("fasp_ext.models.load_model", _must_not_load)
    rc, _, err = run_cli(world, prune_args(world, world / "o"), capsys)
    assert rc == 2 and "quantised" in err and "--model" in err and not (world / "o").exists()
