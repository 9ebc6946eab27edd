"""benchmarks/compare.py runs end to end (functional only: no timing is asserted, ever)."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, clean_env

COMPARE = REPO / "benchmarks" / "compare.py"
PEERS = {"fabric": "lightning", "accelerate": "accelerate"}


@pytest.mark.slow
def test_compare_smoke_runs_every_runner_and_reports_finite_ratios(tmp_path):
    """--smoke on lm-fsdp (the smallest gpt, FSDP2): every runner runs, or is skipped with a reason
    when its package is missing; every ratio is a finite positive number."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(COMPARE), "--smoke", "--workloads", "lm-fsdp", "--out", str(out)],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    # How much other work shared the machine is measured (cores, from /proc/stat) and reported.
    assert result["other_work_cores"] >= 0 and "of the" in proc.stdout and "cores on average" in proc.stdout
    # So is the share of the cores' time the hypervisor gave other guests (steal), run and job by job.
    assert 0 <= result["steal_share"] <= 1 and "the hypervisor took" in proc.stdout
    runners = result["workloads"]["lm-fsdp"]["runners"]
    installed = {name for name, pkg in PEERS.items() if importlib.util.find_spec(pkg) is not None}
    assert set(runners) == {"dist_train", "plain", *installed}
    for name in set(PEERS) - installed:  # a missing peer is named, with how to install it
        assert "pip install" in result["skipped"][name] and f"SKIPPED {name}" in proc.stdout
    for name, entry in runners.items():
        assert entry["ok_rounds"] == 1 and entry["ran"], name
        assert all(0 <= run["steal"] <= 1 for run in entry["runs"]), (name, entry["runs"])
        med = entry["median"]
        assert med["samples_per_s"] > 0 and med["peak_rss_mib"] > 0 and med["step_time_s"] > 0, (name, med)
        if name != "dist_train":
            # CPU s/step is left out: over 2 smoke steps it can be below the kernel's 10 ms tick.
            for metric in ("samples_per_s", "wall_samples_per_s", "peak_rss_mib"):
                ratio = entry["dist_train_ratio"][metric]
                assert ratio["median"] is not None and math.isfinite(ratio["median"]) and ratio["median"] > 0, \
                    (name, metric, ratio)
            assert f"{name:<11}" in proc.stdout  # a table row per runner
    # What actually ran is printed: Accelerate on a CPU-only machine falls back from FSDP2 to DDP.
    assert "what ran:" in proc.stdout and "dist_train strategy=fsdp" in proc.stdout
    # The saved result renders as the Markdown table of the README: a dated header, a row per runner.
    md = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), str(out)], cwd=REPO,
                        env=clean_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith(f"Measured {result['date']} on ")
    rows = [line for line in md.stdout.splitlines() if line.startswith("| lm-fsdp |")]
    assert sorted(row.split(" | ")[1] for row in rows) == sorted(runners)


def test_compare_rejects_unknown_names():
    proc = subprocess.run([sys.executable, str(COMPARE), "--workloads", "lm-fsdp,nope"], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "unknown nope" in proc.stderr
    proc = subprocess.run([sys.executable, str(COMPARE), "--max-steal", "10"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "--max-steal is a share" in proc.stderr


def _bench_module(name):
    sys.path.insert(0, str(REPO / "benchmarks"))  # compare.py imports its siblings by name
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_missing_peers_and_deepspeed_are_skipped_with_the_install_command(monkeypatch):
    compare = _bench_module("compare")
    gone = {"lightning", "deepspeed"}  # and accelerate present, whatever this machine has
    monkeypatch.setattr(compare.importlib.util, "find_spec", lambda n, *a: None if n in gone else "found")
    plan, skipped = compare.make_plan(list(compare.wk.WORKLOAD_NAMES), list(compare.RUNNERS))
    assert plan == {"vision-ddp": ["dist_train", "plain", "accelerate"], "lm-fsdp": ["dist_train", "plain", "accelerate"]}
    assert "pip install -e '.[bench]'" in skipped["fabric"] and "pip install" in skipped["lm-zero2"]
    assert set(skipped) == {"fabric", "lm-zero2"}


def test_paired_ratios_use_only_rounds_where_both_ran():
    report = _bench_module("report")

    ours = [{"round": 0, "ok": True, "samples_per_s": 9.0}, {"round": 1, "ok": True, "samples_per_s": 10.0},
            {"round": 2, "ok": False}]
    theirs = [{"round": 0, "ok": True, "samples_per_s": 10.0}, {"round": 1, "ok": False},
              {"round": 2, "ok": True, "samples_per_s": 5.0}]
    r = report.paired_ratios(ours, theirs, "samples_per_s")
    assert r["rounds"] == [0.9] and r["median"] == 0.9 and r["min"] == 0.9
    summary = report.summarize({"dist_train": ours, "plain": theirs})
    assert summary["plain"]["ok_rounds"] == 2 and summary["plain"]["median"]["samples_per_s"] == 7.5


def test_steal_is_measured_from_proc_stat_and_makes_a_run_noisy(monkeypatch):
    """A VM's stolen time (other guests of the host ran on its cores) is the share of the cores'
    time it counts in /proc/stat's steal field; above 5% the report calls the run noisy."""
    compare, report = _bench_module("compare"), _bench_module("report")
    ticks = iter([[100, 0, 50, 1000, 0, 0, 0, 400], [100, 0, 50, 1000, 0, 0, 0, 400 + 60 * compare.launch.TICK]])
    monkeypatch.setattr(compare.launch, "cpu_fields", lambda: next(ticks))
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 2)
    before = compare.launch.steal_s()
    assert compare.stolen_share(before, 100.0) == pytest.approx(0.3)  # 60 s of 2 cores x 100 s
    # Over a job's timed steps (its first and last progress marks after the warm-up), not its start-up.
    marks = [(1, 0.0, 1.0, 0.0), (5, 10.0, 5.0, 1.0), (10, 20.0, 9.0, 7.0)]
    job = compare.launch.Launch(0, 30.0, 1.0, 9.0, marks=marks)
    steady = job.steady(5, global_batch=4)
    assert steady["timed_steal"] == pytest.approx(0.3) and steady["wall_samples_per_s"] == pytest.approx(2.0)
    assert compare.launch.Launch(0, 30.0, 1.0, 9.0, marks=marks[:2]).steady(5, 4)["timed_steal"] is None
    monkeypatch.setattr(compare.launch, "cpu_fields", lambda: [100, 0, 50, 1000, 0, 0, 0, 400])
    assert compare.busy_cpu_s() == pytest.approx(150 / compare.launch.TICK)  # other work: steal apart
    machine = {"cores": 2}
    quiet = {"machine": machine, "other_work_cores": 0.01, "steal_share": 0.01}
    stolen = {**quiet, "steal_share": 0.3}
    assert report.noise(quiet)[0] is False and report.noise(stolen)[0] is True
    assert "the hypervisor took 30% of their time" in report.noise(stolen)[1]
    line = report.progress_line(0, 1, "lm-fsdp", "plain", {"ok": True, "samples_per_s": 1.0, "peak_rss_mib": 1.0,
                                                            "launch_s": 1.0, "steal": 0.3})
    assert line.endswith("steal 30% (slowed by the hypervisor)")


def test_a_job_slowed_by_the_hypervisor_is_run_again_a_bounded_number_of_times():
    compare = _bench_module("compare")
    attempts = iter([{"ok": True, "steal": 0.4, "samples_per_s": 20.0}, {"ok": True, "steal": 0.01, "samples_per_s": 40.0},
                     {"ok": True, "steal": 0.3, "samples_per_s": 1.0}])
    retaken = []
    res = compare.run_steady(lambda: next(attempts), 0.1, 2, retaken.append)
    assert res["samples_per_s"] == 40.0 and [r["steal"] for r in res["retaken"]] == [0.4] and len(retaken) == 1
    always = lambda: {"ok": True, "steal": 0.5, "samples_per_s": 1.0}  # noqa: E731
    res = compare.run_steady(always, 0.1, 2, lambda r: None)
    assert len(res["retaken"]) == 2  # then kept, as measured (its steal is in the record)
    failed = compare.run_steady(lambda: {"ok": False, "steal": 0.9}, 0.1, 2, lambda r: None)
    assert "retaken" not in failed  # a failure is reported, not retried
    unknown = compare.run_steady(lambda: {"ok": True, "steal": None}, 0.1, 2, lambda r: None)
    assert "retaken" not in unknown  # off Linux: nothing to go by


def test_throughput_explain_times_each_part_of_the_loop():
    """benchmarks/throughput.py --explain (the diagnosis of a step's "other" time): every part it
    wraps still exists under its name, is called once per step, and the parts fit in the loop."""
    script = REPO / "benchmarks" / "throughput.py"
    proc = subprocess.run([sys.executable, str(script), "--model", "mlp", "--data", "digits", "--steps", "12",
                           "--repeats", "1", "--explain"], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for part in ("train_step", "Reporter.maybe_log", "NonFiniteGuard.after_step", "Evaluator.maybe_run",
                 "CheckpointManager.maybe_save", "PreemptionWatcher.requested", "PhaseClock.iteration_done",
                 "GoodputLedger.maybe_update"):
        assert f"  {part} " in proc.stdout and "(12 calls)" in proc.stdout.split(f"  {part} ")[1].splitlines()[0], part
    whole = float(proc.stdout.split("whole loop")[1].split()[0])
    step = float(proc.stdout.split("  train_step ")[1].split()[0])
    assert 0 < step <= whole and "ratio dist_train/plain:" in proc.stdout
