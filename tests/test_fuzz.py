"""Bad input everywhere: random and adversarial ``key=value`` overrides, YAML presets and
checkpoint files. Each must end in exit 2 with one message naming the problem (or exit 0 when
the input happens to be valid, and then the config must be sane): never an exception out of the
CLI, a raw traceback, a hang, or a changed file.

The config fuzz runs in-process through ``cli.main(["--check", ...])`` (milliseconds per case);
checkpoints are resumed in-process by a real single-process run (about a second each); a few real
subprocesses check what a user sees from ``python -m dist_train`` and ``python -m dist_train.launch``.
Hypothesis runs derandomized (the same examples on every machine), without an example database.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conftest import REPO, clean_env, free_port, fuzz_settings, read_summary, run_cli
from dist_train import cli
from dist_train.checkpoint import decode, layout, storage
from dist_train.config import describe_fields, load_config
from dist_train.config.schema import MAX_SEED, MAX_STEPS, JobConfig
from dist_train.launch import main as launch_main, split_args


# --- the verdict every input must get -------------------------------------------------------------

def call_cli(argv: Sequence[str]) -> Tuple[int, str, str]:
    """``cli.main(argv)`` in this process: (exit code, stdout, stderr). Any exception but
    argparse's own SystemExit escapes and fails the test: that is the raw traceback a user sees."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse: e.g. --config without a file -> usage, exit 2
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def assert_clean_verdict(code: int, err: str, argv) -> None:
    assert code in (0, 2), f"exit {code} for {argv!r}:\n{err[-3000:]}"
    assert "Traceback" not in err, f"raw traceback for {argv!r}:\n{err[-3000:]}"
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("dist_train: error:")]
        assert len(lines) == 1, f"not one message for {argv!r}:\n{err}"
        assert len(lines[0]) > len("dist_train: error: ") + 10, lines


def insane(job: JobConfig) -> List[str]:
    """What an accepted config must never hold (each was accepted once, see the git log)."""
    problems = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{prefix}{f.name}={value}")
            elif isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
                problems.append(f"{prefix}{f.name}={value}")

    walk(job, "")
    for key, value in numeric_values(job):
        if value < 0:  # every count, size, rate and timeout of the schema is >= 0
            problems.append(f"{key}={value}")
    if not 0 <= job.train.momentum < 1:
        problems.append(f"train.momentum={job.train.momentum}")
    if not 1 <= job.train.max_steps <= MAX_STEPS:
        problems.append(f"train.max_steps={job.train.max_steps}")
    if not 0 <= job.run.seed <= MAX_SEED:
        problems.append(f"run.seed={job.run.seed}")
    if job.run.name in (".", "..") or "/" in job.run.name:
        problems.append(f"run.name={job.run.name!r}")
    return problems


def numeric_values(job: JobConfig):
    """(dotted key, value) of every int and float leaf (bools excluded) of an accepted config."""
    for key, _default, _help in describe_fields():
        obj = job
        for part in key.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, (int, float)) and not isinstance(obj, bool):
            yield key, obj


def tree_digest(root: Path) -> Dict[str, str]:
    """{relative path: sha256 (or link target)} of everything under ``root``."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding an existing run (runs/default, the default run.dir) whose
    files must come out of every check unchanged."""
    run = tmp_path / "runs" / "default"
    (run / "checkpoints" / "step_00000005").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  lr: 0.1\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "checkpoints" / "latest").write_text("step_00000005\n")
    (run / "checkpoints" / "step_00000005" / "meta.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    before = tree_digest(tmp_path)
    yield tmp_path
    assert tree_digest(tmp_path) == before, "a check changed or left files in the working directory"


# --- overrides --------------------------------------------------------------------------------------

LEAVES = [key for key, _default, _help in describe_fields()]
SECTIONS = sorted({key.rsplit(".", 1)[0] for key in LEAVES if "." in key} | {key.split(".")[0] for key in LEAVES})
DEFAULTS = sorted({str(default) for _key, default, _help in describe_fields() if not isinstance(default, dict)})
ADVERSARIAL = [
    "nan", "inf", "-inf", ".inf", "-.nan", "1e400", "-1e400", "1e-400", "-1", "-0.0", "0", "0.5", "1", "1.5", "2",
    "99999999999999999999999", "100000000", "9223372036854775808", "-9223372036854775809", "0x10", "1_000", "1e3",
    "true", "false", "yes", "null", "~", "", "''", '""', "[]", "{}", "[1,", "{", "[nan, 0.9]", "[0.9]", "{a: 1}",
    "${oc.env:HOME}", "${nosuch}", "${run.name}", "${oc.decode:'[1'}", "..", ".", "/", "/dev/null", "/proc/1/x",
    "/nonexistent/dir", "a\x00b", "\U0001F600", " ", "a=b", "auto", "never", "deepspeed_nope", "x" * 300,
]
keys = st.one_of(st.sampled_from(LEAVES), st.sampled_from(SECTIONS),
                 st.text(alphabet="abtrainx._[]+~0 =", max_size=14))
plain_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=16)  # argv holds no surrogates
values = st.one_of(st.sampled_from(ADVERSARIAL), st.sampled_from(DEFAULTS),
                   st.integers(min_value=-2**70, max_value=2**70).map(str),
                   st.floats().map(repr), plain_text)
overrides = st.builds(lambda k, v: f"{k}={v}", keys, values)


real_overrides = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(LEAVES), values)  # a key that exists


@fuzz_settings(150)
@given(st.lists(st.one_of(real_overrides, overrides), min_size=1, max_size=3))
def test_random_overrides_exit_0_or_2_with_one_message(workdir, items):
    code, _out, err = call_cli(["--check", *items])
    assert_clean_verdict(code, err, items)
    if code == 0:
        assert not insane(load_config(None, items)), items


NUMERIC_KEYS = [key for key, default, _help in describe_fields()
                if isinstance(default, (int, float)) and not isinstance(default, bool)]
EDGES = ["nan", "inf", "-inf", "1e400", "-1", "-0.5", "1.5", "99999999999999999999999", "1e-300", "0"]


@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_every_numeric_key_refuses_nan_inf_negative_and_huge(workdir, key):
    """NaN, infinities, negatives, fractions and huge numbers for every numeric key: each is
    refused by name, or accepted only into a sane config."""
    for value in EDGES:
        item = f"{key}={value}"
        code, _out, err = call_cli(["--check", item])
        assert_clean_verdict(code, err, item)
        if code == 2:  # named: as the key, or in a cross-field message (n_embd with n_head)
            assert key in err, err
        else:
            assert not insane(load_config(None, [item])), item


@fuzz_settings(100)
@given(st.lists(st.one_of(plain_text, st.sampled_from(["--config", "--check", "--print-config", "--", "-x",
                                                       "--config=", "--bogus=1"])), max_size=4))
def test_random_argv_tokens(workdir, argv):
    argv = ["--check", *argv]  # (never a training run: --check wins over everything)
    code, _out, err = call_cli(argv)
    assert_clean_verdict(code, err, argv)


@pytest.mark.parametrize("override,key", [
    ("train.lr=inf", "train.lr"),                     # was accepted
    ("train.lr=1e400", "train.lr"),                   # YAML reads it as inf
    ("train.momentum=-0.5", "train.momentum"),        # was accepted
    ("train.momentum=1.5", "train.momentum"),
    ("train.weight_decay=inf", "train.weight_decay"),
    ("train.grad_clip=inf", "train.grad_clip"),
    ("logging.mlflow.flush_timeout_s=inf", "logging.mlflow.flush_timeout_s"),  # would wait forever at exit
    ("train.max_steps=100000000", "train.max_steps"),  # step_XXXXXXXX names hold 8 digits
    ("run.seed=99999999999999999999", "run.seed"),     # torch.manual_seed overflowed at start-up
    ("run.name=..", "run.name"),                       # run.dir would be the working directory
    ("run.name=.", "run.name"),
    ("train.lr=[1", "train.lr"),                       # YAML parse error escaped as a traceback
    ("data=5", "data"),                                # a section given a number
    ("model.gpt=[1]", "model.gpt"),
    ("train.nosuch=1", "train.nosuch"),
    ("data.root=/nonexistent/fashion", "data.root"),   # was a traceback and exit 1
    ("data.root=/etc/hostname", "data.root"),
    ("run.dir=/dev/null", "run.dir"),
    ("run.dir=/etc/hostname/run", "run.dir"),
    ("run.dir=/proc/1/run", "run.dir"),                # not writable, even by root
    ("checkpoint.resume=/etc/hostname", "checkpoint.resume"),
    ("checkpoint.resume=/", "checkpoint.resume"),
    ("data.num_workers=100000", "data.num_workers"),   # a fork bomb
])
def test_known_bad_overrides_are_named(workdir, override, key):
    code, _out, err = call_cli(["--check", override])
    assert_clean_verdict(code, err, override)
    assert code == 2 and f"bad config: {key}:" in err, err


# --- YAML presets -----------------------------------------------------------------------------------

def nest(flat: Dict[str, object]) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}} (a later key may overwrite an earlier section with a value)."""
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *parents, last = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return out


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(),
                    plain_text, st.sampled_from(ADVERSARIAL))
yaml_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(plain_text, inner, max_size=3)),
                           max_leaves=8)
yaml_docs = st.one_of(
    st.dictionaries(st.sampled_from(LEAVES + SECTIONS), yaml_values, max_size=4).map(nest),  # plausible presets
    yaml_values,                                                                              # anything at all
)


@fuzz_settings(80)
@given(st.one_of(yaml_docs.map(lambda doc: yaml.safe_dump(doc, allow_unicode=True).encode()),
                 st.binary(max_size=300)))
def test_random_yaml_presets_exit_0_or_2_with_one_message(workdir, content):
    preset = workdir / "preset.yaml"
    preset.write_bytes(content)
    code, _out, err = call_cli(["--check", "--config", str(preset)])
    assert_clean_verdict(code, err, content[:200])
    if code == 0:
        assert not insane(load_config(str(preset))), content[:200]
    preset.unlink()


BILLION_LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefg", "bcdefgh")) + "train:\n  betas: *h\n"


@pytest.mark.parametrize("name,content,expect", [
    ("list", "- train\n- lr\n", "must hold a mapping"),
    ("scalar", "42\n", "cannot parse"),
    ("binary", bytes(range(256)), "cannot parse"),
    ("deep", "a:\n" + "".join("  " * i + f"a{i}:\n" for i in range(1, 2000)), "cannot parse"),
    ("deep_flow", "train: " + "[" * 3000 + "]" * 3000, "cannot parse"),
    ("billion_laughs", BILLION_LAUGHS, "cannot parse"),
    ("python_tag", "train: !!python/object/apply:os.system ['touch pwned']\n", "cannot parse"),
    ("section_is_list", "train: [1, 2]\n", "bad config: train: is a section"),
    ("unknown_section", "trian:\n  lr: 0.1\n", "bad config: trian: unknown key"),
    ("lr_inf", "train:\n  lr: .inf\n", "bad config: train.lr"),
    ("two_documents", "train: {}\n---\nrun: {}\n", "cannot parse"),
    ("duplicate_key", "train:\n  lr: 0.1\n  lr: 0.2\n", "cannot parse"),
])
def test_adversarial_yaml_files(workdir, name, content, expect):
    preset = workdir / f"{name}.yaml"
    preset.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _out, err = call_cli(["--check", "--config", str(preset)])
    assert_clean_verdict(code, err, name)
    assert code == 2 and expect in err, err
    assert not (workdir / "pwned").exists()
    preset.unlink()


def test_config_paths_that_are_not_files(workdir):
    loop = workdir / "loop.yaml"
    os.symlink(loop, loop)
    fifo = workdir / "fifo.yaml"
    os.mkfifo(fifo)  # opening it would block forever: it must be refused unread
    for path, expect in [(workdir, "is a directory"), (loop, "no such file"), (fifo, "not a regular file"),
                         (workdir / "missing.yaml", "no such file")]:
        code, _out, err = call_cli(["--check", "--config", str(path)])
        assert_clean_verdict(code, err, path)
        assert code == 2 and expect in err, err
    loop.unlink()
    fifo.unlink()


def test_an_empty_section_is_no_change(workdir):
    """``train:`` with every key commented out is null in YAML: the defaults stay."""
    preset = workdir / "empty_section.yaml"
    preset.write_text("train:\n  # lr: 0.1\n")
    assert load_config(str(preset)).train.lr == load_config().train.lr
    preset.unlink()


# --- checkpoint files -------------------------------------------------------------------------------

TINY = ["model.name=mlp", "model.hidden=8", "data.name=digits", "data.batch_size=8", "data.num_workers=0",
        "eval.max_batches=1", "logging.mlflow.enabled=false", "logging.progress_bar=off"]


def run_in_process(argv: Sequence[str]) -> Tuple[int, str]:
    """A real single-process training run in this process: (exit code, stderr with the log)."""
    code, _out, err = call_cli(argv)
    return code, err


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory) -> Path:
    """A real checkpoint (step 2) of a tiny run, never modified: tests copy it."""
    run = tmp_path_factory.mktemp("source") / "run"
    code, err = run_in_process([*TINY, "train.max_steps=2", f"run.dir={run}"])
    assert code == 0, err[-3000:]
    return run / "checkpoints" / "step_00000002"


def resume(ckpt: Path, run_dir: Path, *extra: str) -> Tuple[int, str]:
    return run_in_process([*TINY, "train.max_steps=2", f"run.dir={run_dir}", f"checkpoint.resume={ckpt}", *extra])


def rehash(ckpt: Path) -> None:
    """Rewrite the manifest so that it matches whatever the files now hold: a manifest that lies."""
    files = layout.list_files(str(ckpt))
    layout.write_manifest(str(ckpt), 2, layout.describe_files(str(ckpt), files))


def mutate(ckpt: Path, outside: Path, data) -> str:
    """Damage one file of ``ckpt`` the way disks, copies and people do; returns what was done."""
    names = sorted(layout.list_files(str(ckpt))) + [layout.MANIFEST]
    rel = data.draw(st.sampled_from(names), label="file")
    path = ckpt / rel
    size = path.stat().st_size
    how = data.draw(st.sampled_from(["truncate", "flip", "random", "append", "delete", "empty",
                                     "link_outside", "link_loop"]), label="how")
    if how == "truncate":
        os.truncate(path, data.draw(st.integers(0, max(size - 1, 0)), label="length"))
    elif how == "flip":
        raw = bytearray(path.read_bytes())
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            i = data.draw(st.integers(0, len(raw) - 1), label="at")
            raw[i] ^= data.draw(st.integers(1, 255), label="xor")
        path.write_bytes(bytes(raw))
    elif how == "random":
        path.write_bytes(data.draw(st.binary(min_size=0, max_size=2 * size + 8), label="bytes"))
    elif how == "append":
        with open(path, "ab") as f:
            f.write(b"\0garbage")
    elif how == "delete":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "link_outside":
        path.unlink()
        os.symlink(outside, path)
    else:
        path.unlink()
        os.symlink(path, path)
    return f"{how} {rel}"


@fuzz_settings(12)
@given(data=st.data())
def test_damaged_checkpoints_are_refused_by_name_and_left_as_they_are(source_ckpt, tmp_path_factory, data):
    """Truncated, flipped, random, deleted or symlinked files: a damaged checkpoint given as
    checkpoint.resume is refused (exit 2, one message naming it), and nothing is changed or read
    outside it. A mutation that left it valid (verify() passes) resumes (exit 0)."""
    base = tmp_path_factory.mktemp("damaged")
    ckpt = base / "ckpt" / "step_00000002"
    shutil.copytree(source_ckpt, ckpt)
    outside = base / "outside.bin"
    outside.write_bytes(b"not part of any checkpoint\n")
    what = mutate(ckpt, outside, data)
    valid = not layout.verify(str(ckpt))
    before = tree_digest(base / "ckpt")
    code, err = resume(ckpt, base / "run")
    assert "Traceback" not in err, f"{what}:\n{err[-3000:]}"
    assert code == (0 if valid else 2), f"{what}: exit {code}\n{err[-3000:]}"
    if not valid:
        assert "bad checkpoint" in err and "step_00000002" in err, err[-2000:]
    assert tree_digest(base / "ckpt") == before, what
    assert outside.read_bytes() == b"not part of any checkpoint\n"


def _link_loop(ckpt: Path) -> Path:
    loop = ckpt.parent / "loop"
    os.symlink(loop, loop)
    return loop


def _dangling(ckpt: Path) -> Path:
    link = ckpt.parent / "dangling"
    os.symlink(ckpt.parent / "gone", link)
    return link


def _a_file(ckpt: Path) -> Path:
    return ckpt / layout.META


def _no_checkpoint(ckpt: Path) -> Path:
    empty = ckpt.parent / "empty"
    empty.mkdir()
    return empty


@pytest.mark.parametrize("make,expect", [
    (_link_loop, "ckpt/loop"),      # (preflight's own "no checkpoint at" comes first today; either names it)
    (_dangling, "ckpt/dangling"),
    (_a_file, "is a file"),
    (_no_checkpoint, "holds no step_XXXXXXXX"),
])
def test_resume_paths_that_are_no_checkpoint(source_ckpt, tmp_path, make, expect):
    ckpt = tmp_path / "ckpt" / "step_00000002"
    shutil.copytree(source_ckpt, ckpt)
    code, err = resume(make(ckpt), tmp_path / "run")
    assert code == 2 and "Traceback" not in err and "bad config: checkpoint.resume:" in err and expect in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_run_dir_to_resume_gives_its_newest_verified_checkpoint_whatever_latest_says(tmp_path):
    """checkpoint.resume=<run dir>: ``latest`` may be stale (a crash between a commit's rename and
    its update) and the newest may be damaged: the newest that verifies is taken, as auto does,
    and the source run's checkpoints are left as they are."""
    src = tmp_path / "src"
    code, err = run_in_process([*TINY, "train.max_steps=3", "checkpoint.every_steps=1", f"run.dir={src}"])
    assert code == 0, err[-3000:]
    ckpts = src / "checkpoints"
    (ckpts / layout.LATEST).write_text("step_00000001\n")
    meta = ckpts / "step_00000003" / layout.META
    meta.write_bytes(meta.read_bytes()[:-5])  # the newest no longer verifies (a size mismatch)
    code, err = run_in_process([*TINY, "train.max_steps=4", f"run.dir={tmp_path / 'run'}", f"checkpoint.resume={src}"])
    assert code == 0, err[-3000:]
    assert read_summary(tmp_path / "run")["resumed_from_step"] == 2, err[-3000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000001", "step_00000002", "step_00000003"]


def test_manifest_listing_a_file_outside_the_checkpoint_is_refused(source_ckpt, tmp_path):
    """A manifest entry ``../../secret`` with the secret's true size and hash: verification
    would pass only by reading the secret. It is refused without reading it."""
    ckpt = tmp_path / "ckpt" / "step_00000002"
    shutil.copytree(source_ckpt, ckpt)
    secret = tmp_path / "secret"
    secret.write_bytes(b"password\n")
    manifest = json.loads((ckpt / layout.MANIFEST).read_text())
    manifest["files"]["../../secret"] = {"size": 9, "sha256": hashlib.sha256(b"password\n").hexdigest()}
    (ckpt / layout.MANIFEST).write_text(json.dumps(manifest))
    errors = layout.verify(str(ckpt))
    assert errors and "../../secret" in errors[0] and "not a plain relative path" in errors[0]
    code, err = resume(ckpt, tmp_path / "run")
    assert code == 2 and "Traceback" not in err and "../../secret" in err, err[-2000:]


@pytest.mark.parametrize("entry", ["/etc/passwd", "dcp/../../x", "./meta.json", "", "a\x00b", "."])
def test_manifest_entries_must_be_plain_paths_inside(source_ckpt, tmp_path, entry):
    ckpt = tmp_path / "step_00000002"
    shutil.copytree(source_ckpt, ckpt)
    manifest = json.loads((ckpt / layout.MANIFEST).read_text())
    manifest["files"][entry] = {"size": 0, "sha256": "0" * 64}
    (ckpt / layout.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a plain relative path"):
        layout.read_manifest(str(ckpt))


def test_manifest_entry_through_a_symlinked_directory_is_refused(source_ckpt, tmp_path):
    ckpt = tmp_path / "step_00000002"
    shutil.copytree(source_ckpt, ckpt)
    (tmp_path / "elsewhere").mkdir()
    shutil.move(str(ckpt / "rng"), str(tmp_path / "elsewhere" / "rng"))
    os.symlink(tmp_path / "elsewhere" / "rng", ckpt / "rng")
    assert "resolves outside the checkpoint" in layout.verify(str(ckpt))[0]


@pytest.mark.parametrize("target", ["inside", "outside"])
def test_manifest_entry_that_is_a_symlink_is_judged_by_where_it_points(source_ckpt, tmp_path, target):
    ckpt = tmp_path / "step_00000002"
    shutil.copytree(source_ckpt, ckpt)
    where = (ckpt / "rng" / "moved.pt") if target == "inside" else (tmp_path / "moved.pt")
    rng = next((ckpt / "rng").iterdir())
    shutil.move(str(rng), str(where))
    os.symlink(where, rng)
    problems = layout.verify(str(ckpt))
    if target == "inside":
        assert problems == []
    else:
        assert len(problems) == 1 and "resolves outside the checkpoint" in problems[0], problems


# Link targets for the property below (relative ones from the link's own directory, at any depth):
# inside the checkpoint, the checkpoint itself, outside it, other links (chains, loops), nothing.
_LINK_TARGETS = ["f", "d", "d/f", "d/e", "d/e/f", "../out", "../out/f", "../../out", "../../../out/f", "..", ".",
                 "l0", "l1", "l2", "d/l0", "missing", "/ROOT/d", "/ROOT/d/f", "/ROOT", "/OUT/f", "../ckpt/d",
                 "../ckpt2"]
_COMPONENTS = ["f", "d", "e", "l0", "l1", "l2", "missing", "x"]


@fuzz_settings(200)
@given(links=st.lists(st.tuples(st.sampled_from(["l0", "l1", "l2", "d/l0", "d/e/l1"]), st.sampled_from(_LINK_TARGETS)),
                      max_size=4, unique_by=lambda t: t[0]),
       entries=st.lists(st.lists(st.sampled_from(_COMPONENTS), min_size=1, max_size=4).map("/".join),
                        min_size=1, max_size=6))
def test_manifest_entries_stay_inside_exactly_when_their_real_path_does(tmp_path_factory, links, entries):
    """Property (hypothesis): over random trees of files, directories and symbolic links (into the
    checkpoint, relative or absolute, to it, out of it, to a sibling directory whose name starts
    like it, chains, loops, dangling), ``layout._stays_inside`` (one lstat per component, realpath
    only at a link; directories it found plain shared across entries) says "inside" exactly when
    ``os.path.realpath`` of the entry lies under the checkpoint, or a component is missing."""
    base = tmp_path_factory.mktemp("tree")
    root, out = base / "ckpt", base / "out"
    for d in (root / "d" / "e", out, base / "ckpt2"):
        d.mkdir(parents=True)
    for f in (root / "f", root / "d" / "f", root / "d" / "e" / "f", out / "f"):
        f.write_text("x")
    for name, target in links:
        target = target.replace("/ROOT", str(root)).replace("/OUT", str(out))
        if (root / name).parent.is_dir() and not os.path.lexists(root / name):
            os.symlink(target, root / name)
    real = os.path.realpath(root)
    plain_dirs: set = set()
    for rel in entries:
        parts = rel.split("/")
        missing = not all(os.path.lexists(os.path.join(real, *parts[:i + 1])) for i in range(len(parts)))
        expected = os.path.realpath(os.path.join(real, rel)).startswith(real + os.sep)
        got = layout._stays_inside(real, rel, plain_dirs)
        if missing and got:  # (a missing component: the size check names the entry instead)
            continue
        assert got == expected, (rel, links)


@pytest.mark.parametrize("value", [{"size": -1, "sha256": "0" * 64}, {"size": True, "sha256": "0" * 64},
                                   {"size": 1, "sha256": "xyz"}, {"size": 1}, [1, 2], None])
def test_manifest_entries_must_be_size_and_sha256(source_ckpt, tmp_path, value):
    ckpt = tmp_path / "step_00000002"
    shutil.copytree(source_ckpt, ckpt)
    manifest = json.loads((ckpt / layout.MANIFEST).read_text())
    manifest["files"][layout.META] = value
    (ckpt / layout.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="whose entry is not"):
        layout.read_manifest(str(ckpt))


def test_checkpoint_of_another_model_is_refused_and_left_as_it_is(source_ckpt, tmp_path):
    before = tree_digest(source_ckpt)
    code, err = resume(source_ckpt, tmp_path / "run", "model.hidden=16")
    assert code == 2 and "Traceback" not in err and "model.hidden=8" in err, err[-2000:]
    assert tree_digest(source_ckpt) == before


def point_dcp_index_outside(ckpt: Path) -> None:
    """Move the tensor data out of ``ckpt`` and make its DCP index (.metadata) name it as
    ``../../../outside.distcp``."""
    shard = next((ckpt / layout.DCP_DIR).glob("*.distcp"))
    shutil.move(str(shard), str(ckpt.parent.parent / "outside.distcp"))
    metadata = decode.read_metadata(str(ckpt / layout.DCP_DIR))
    for info in metadata.storage_data.values():
        info.relative_path = "../../../outside.distcp"
    with open(ckpt / layout.DCP_DIR / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def test_dcp_index_naming_a_file_outside_is_refused(source_ckpt, tmp_path):
    """A crafted DCP index whose data file lies outside the checkpoint, with a manifest rehashed
    to match: DCP used to read the tensors from there (the load succeeded)."""
    ckpt = tmp_path / "ckpt" / "step_00000002"
    shutil.copytree(source_ckpt, ckpt)
    point_dcp_index_outside(ckpt)
    rehash(ckpt)
    assert layout.verify(str(ckpt)) == []  # the manifest lies consistently
    with pytest.raises(pickle.UnpicklingError, match="not a file of this directory"):
        storage.load_full_model(str(ckpt / layout.DCP_DIR))


LYING = {
    "meta_json_garbage": lambda ckpt: (ckpt / layout.META).write_bytes(b"\x00\xff not json"),
    "meta_json_missing_keys": lambda ckpt: (ckpt / layout.META).write_text(json.dumps(
        {k: v for k, v in json.loads((ckpt / layout.META).read_text()).items() if k not in ("train_state", "kind")})),
    "dcp_index_garbage": lambda ckpt: (ckpt / layout.DCP_DIR / ".metadata").write_bytes(os.urandom(64)),
    "rng_state_garbage": lambda ckpt: (ckpt / layout.rng_file(0)).write_bytes(b"PK\x03\x04 not a torch file"),
    "dcp_index_outside": point_dcp_index_outside,
}


@pytest.mark.parametrize("damage", sorted(LYING))
def test_a_manifest_that_lies_consistently_is_refused_by_name(source_ckpt, tmp_path, damage):
    ckpt = tmp_path / "ckpt" / "step_00000002"
    shutil.copytree(source_ckpt, ckpt)
    LYING[damage](ckpt)
    rehash(ckpt)
    code, err = resume(ckpt, tmp_path / "run")
    assert code == 2 and "Traceback" not in err and "step_00000002" in err, err[-2000:]


# --- what a user sees from real commands ------------------------------------------------------------

def launch(args: Sequence[str], timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dist_train.launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_launch_gives_one_message_for_a_bad_config():
    """Under plain torchrun a bad config gave each rank's exit plus torchrun's ChildFailedError
    traceback, and exit 1. The launcher checks first: one message, exit 2, no worker started."""
    proc = launch([*TINY, "train.lr=inf"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "bad config: train.lr:" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_launch_checks_at_the_world_size_torchrun_will_start(capsys):
    """``strategy.name=single`` passes a one-process check; at --nproc_per_node=2 it is refused
    before torchrun starts anything (in this process: nothing is launched)."""
    assert launch_main(["--nproc_per_node=2", "--standalone", *TINY, "strategy.name=single"]) == 2
    err = capsys.readouterr().err
    assert err.count("dist_train: error:") == 1 and "this job has world size 2" in err, err
    assert "RANK" not in os.environ or os.environ.get("WORLD_SIZE") != "2"  # the check's environment is undone
    assert launch_main(["--nproc_per_node=2", "-m", "x"]) == 2
    assert "always runs -m dist_train" in capsys.readouterr().err


def test_launch_refusing_a_config_rewrites_an_existing_run_dirs_summary(tmp_path, capsys):
    """A run dir's summary.json never tells an older attempt's outcome: the launcher's check
    records its refusal there, as the CLI does (it left "completed", exit 0, in place)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "completed", "exit_code": 0, "steps": 12}))
    assert launch_main(["--nproc_per_node=2", "--standalone", *TINY, f"run.dir={run}", "data.batch_size=0"]) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 2 and "data.batch_size" in summary["error"]
    assert "bad config: data.batch_size" in capsys.readouterr().err


def test_launch_splits_torchrun_options_from_dist_train_arguments():
    assert split_args(["--nproc_per_node", "2", "--standalone", "--max-restarts=1", "--config", "f.yaml", "a=b"]) == (
        ["--nproc_per_node", "2", "--standalone", "--max-restarts=1"], ["--config", "f.yaml", "a=b"])
    assert split_args(["train.lr=0.1", "--nproc_per_node=2"]) == ([], ["train.lr=0.1", "--nproc_per_node=2"])
    assert split_args(["--master_addr=h", "-h"]) == (["--master_addr=h"], ["-h"])


@pytest.mark.slow
def test_launch_passes_on_a_workers_exit_code_without_torchruns_traceback(source_ckpt, tmp_path):
    """A refusal only the workers can make (the checkpoint is of another model): exit 2 from every
    rank; the launcher prints one line and exits 2, not torchrun's traceback and 1."""
    proc = launch([*TINY, "model.hidden=16", "train.max_steps=2", f"run.dir={tmp_path / 'run'}",
                   f"checkpoint.resume={source_ckpt}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("dist_train.launch: rank") == 1 and "model.hidden=8" in proc.stderr


def test_cli_unwritable_run_dir_exits_2(tmp_path):
    """It was a raw traceback from os.makedirs and exit 1 (a missing data.root too: see
    test_known_bad_overrides_are_named). The parent is made immutable with chattr +i: root
    ignores permission bits."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        proc = run_cli([*TINY, "train.max_steps=1", f"run.dir={locked / 'run'}"], timeout=120)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and proc.stderr.count("bad config: run.dir:") == 1, proc.stderr
        assert "not writable" in proc.stderr and os.listdir(locked) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
