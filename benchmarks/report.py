"""Medians, paired ratios and the printed table of ``compare.py``.

A ratio is dist_train's number over another runner's from the same round (the two ran minutes
apart under the same load), so a round the whole machine was slow in cancels out; the median of
those per-round ratios is reported, and the smallest (the issue's "never below" target).
Throughput ratios above 1 mean dist_train is faster; CPU and memory ratios above 1 mean it uses more.

    python benchmarks/report.py runs/bench/compare.json    # a saved result as the Markdown table of the docs
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from typing import Dict, List, Optional, Tuple

from workloads import WORKLOAD_NAMES

# compare.py's runners, in its order (a saved result's keys come back sorted: tables use this order).
RUNNERS = ("dist_train", "plain", "fabric", "accelerate")
METRICS = ("samples_per_s", "wall_samples_per_s", "step_time_s", "cpu_s_per_step", "peak_rss_mib", "train_rss_mib")
RATIOS = ("samples_per_s", "wall_samples_per_s", "cpu_s_per_step", "peak_rss_mib")


def _median(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def paired_ratios(ours: List[Dict], theirs: List[Dict], metric: str) -> Dict:
    """dist_train / runner for ``metric``, per round where both succeeded; median and min."""
    by_round = {r["round"]: r for r in theirs if r["ok"] and r.get(metric)}
    per_round = [o[metric] / by_round[o["round"]][metric] for o in ours
                 if o["ok"] and o.get(metric) and o["round"] in by_round]
    return {"median": _median(per_round), "min": min(per_round) if per_round else None,
            "max": max(per_round) if per_round else None, "rounds": per_round}


def summarize(by_runner: Dict[str, List[Dict]]) -> Dict[str, Dict]:
    """Per runner: what ran, every run, the medians, and dist_train's ratios to it."""
    ours = by_runner.get("dist_train", [])
    out: Dict[str, Dict] = {}
    for runner, runs in by_runner.items():
        ok = [r for r in runs if r["ok"]]
        entry = {"ran": ok[0].get("ran") if ok else None, "ok_rounds": len(ok), "runs": runs,
                 "median": {m: _median([r.get(m) for r in ok]) for m in METRICS}}
        if runner != "dist_train":
            entry["dist_train_ratio"] = {m: paired_ratios(ours, runs, m) for m in RATIOS}
        out[runner] = entry
    return out


def progress_line(rnd: int, rounds: int, workload: str, runner: str, res: Dict) -> str:
    head = f"[round {rnd + 1}/{rounds}] {workload:<10} {runner:<10}"
    if not res["ok"]:
        return f"{head} FAILED: {res['error'].splitlines()[0]} (launch {res['launch_s']:.0f} s)"
    wall = res.get("wall_samples_per_s")
    return (f"{head} {res['samples_per_s']:8.2f} samples/s (wall {_num(wall, 2)}), "
            f"{_num(res.get('cpu_s_per_step'), 2)} CPU s/step, peak RSS {res['peak_rss_mib']:.0f} MiB, "
            f"launch {res['launch_s']:.0f} s" + _steal(res.get("steal")))


def _steal(share: Optional[float]) -> str:
    """A job's stolen share, when it is large enough to move its numbers."""
    return f", steal {100 * share:.0f}% (slowed by the hypervisor)" if share is not None and share >= 0.02 else ""


def _num(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _step_ms(entry: Dict) -> Optional[float]:
    step_s = entry["median"]["step_time_s"]
    return None if step_s is None else step_s * 1000


def _ratio(entry: Dict, metric: str) -> str:
    r = entry.get("dist_train_ratio", {}).get(metric)
    if not r or r["median"] is None:
        return "-"
    return f"{r['median']:.3f} ({r['min']:.3f})" if len(r["rounds"]) > 1 else f"{r['median']:.3f}"


# Other work using more than this many cores on average makes a run "noisy"; so does a hypervisor
# taking more than this share of the cores' time (steal).
NOISY_CORES = 0.2
NOISY_STEAL = 0.05


def noise(result: Dict) -> Tuple[bool, str]:
    """(noisy, a phrase) for how much other work shared the machine during the run: the cores it
    used on average and the share of the cores' time the hypervisor gave to other guests
    (compare.py measures both from /proc/stat), else the load average."""
    m, other, steal = result["machine"], result.get("other_work_cores"), result.get("steal_share")
    if other is not None:
        how = f"other work used {other:.2f} of the {m['cores']} cores on average"
        if steal is not None:
            how += f", the hypervisor took {100 * steal:.0f}% of their time (steal)"
        return other > NOISY_CORES or (steal or 0) > NOISY_STEAL, how
    load = max(result["load_avg_start"][0], result["load_avg_end"][0])
    return load > 0.5 * (m["cores"] or 1), f"load average up to {load:.1f} on {m['cores']} cores"


def render(result: Dict) -> str:
    """The human-readable report of one ``compare.py`` invocation."""
    m = result["machine"]
    lines = [
        "",
        f"dist_train benchmark, {result['date']}: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"torch {m['torch']}, {result['nproc']} ranks",
        f"{result['rounds']} round(s), runners alternating; medians over rounds; warm-up: first "
        f"{result['warmup_steps']} steps of each process untimed; took {result['elapsed_s']:.0f} s",
        f"load average at start {result['load_avg_start'][0]:.1f}, at end {result['load_avg_end'][0]:.1f} "
        f"(on {m['cores']} cores); {noise(result)[1]}",
    ]
    if result.get("retaken_jobs"):
        lines.append(f"{result['retaken_jobs']} job(s) run again ({result.get('reruns')} rerun(s) in all): "
                     f"the hypervisor took more than "
                     f"{100 * result['max_steal']:.0f}% of the cores' time during them")
    if noise(result)[0]:
        lines.append("NOTE: other work (on this machine, or other guests of its host: steal) was loading it: "
                     "absolute numbers are noisy; "
                     "trust the paired ratios more, and rerun on a quiet machine")
    header = (f"{'runner':<11}{'samples/s':>10}{'wall s/s':>10}{'step ms':>9}{'CPU s/step':>11}{'peak RSS':>10}"
              f"{'train RSS':>10}   dist_train/runner: {'samples/s (min)':<16}{'wall':<16}{'CPU':<16}{'peak RSS':<8}")
    for name, wl in result["workloads"].items():
        lines += ["", f"== {name}: {' '.join(o for o in wl['overrides'])}", header]
        for runner, e in wl["runners"].items():
            med, step_ms = e["median"], _step_ms(e)
            lines.append(f"{runner:<11}{_num(med['samples_per_s'], 2):>10}{_num(med['wall_samples_per_s'], 2):>10}"
                         f"{_num(step_ms, 0):>9}{_num(med['cpu_s_per_step'], 2):>11}{_num(med['peak_rss_mib'], 0):>10}"
                         f"{_num(med['train_rss_mib'], 0):>10}   {'':<19}{_ratio(e, 'samples_per_s'):<16}"
                         f"{_ratio(e, 'wall_samples_per_s'):<16}{_ratio(e, 'cpu_s_per_step'):<16}{_ratio(e, 'peak_rss_mib'):<8}")
        lines.append("what ran:")
        for runner, e in wl["runners"].items():
            failed = len(e["runs"]) - e["ok_rounds"]
            note = f" ({failed} failed round(s))" if failed else ""
            lines.append(f"  {runner:<11}{e['ran'] or 'FAILED in every round'}{note}")
    for name, why in result["skipped"].items():
        lines.append(f"SKIPPED {name}: {why}")
    lines += ["", "samples/s: dist_train's accounting (summary.json): the loop's time per step (data wait, step, "
              "bookkeeping; evaluation and saves left out), summed after warm-up; wall s/s: the same steps by the clock, so also what runs between steps; CPU s/step: "
              "CPU time of all ranks per step (moves little with load); MiB: peak RSS of the largest process, and "
              "rank 0's RSS after the last step"]
    return "\n".join(lines)




def _in_order(table: Dict, order: Tuple[str, ...]) -> List[Tuple[str, Dict]]:
    return sorted(table.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))


def _md_ratio(entry: Dict, metric: str) -> str:
    r = entry.get("dist_train_ratio", {}).get(metric)
    if not r or r["median"] is None:
        return "-"
    return f"{r['median']:.3f} ({r['min']:.2f}-{r['max']:.2f})" if len(r["rounds"]) > 1 else f"{r['median']:.3f}"


def markdown(result: Dict) -> str:
    """A saved result as the Markdown of README.md and docs/benchmarks.md: a header line with the
    date, machine and load, then one row per workload and runner."""
    m = result["machine"]
    noisy, how = noise(result)
    lines = [f"Measured {result['date']} on {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python "
             f"{m['python']}, torch {m['torch']}, {'CUDA' if m['cuda'] else 'CPU only'}, {result['nproc']} "
             f"{'NCCL' if m['cuda'] else 'gloo'} ranks; {result['rounds']} alternating round(s), "
             f"{result['elapsed_s']:.0f} s in all; {how} ({'**noisy**' if noisy else 'quiet'}). Ratios: median "
             "over rounds of dist_train / runner (min-max over rounds).", "",
             "| workload | runner | what ran | samples/s | step ms | CPU s/step | peak RSS MiB | dist_train / runner: "
             "samples/s | CPU s/step | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, wl in _in_order(result["workloads"], WORKLOAD_NAMES):
        for runner, e in _in_order(wl["runners"], RUNNERS):
            med, step_ms = e["median"], _step_ms(e)
            lines.append(f"| {name} | {runner} | {e['ran'] or 'failed'} | {_num(med['samples_per_s'], 2)} | "
                         f"{_num(step_ms, 0)} | {_num(med['cpu_s_per_step'], 2)} | {_num(med['peak_rss_mib'], 0)} | "
                         f"{_md_ratio(e, 'samples_per_s')} | {_md_ratio(e, 'cpu_s_per_step')} | "
                         f"{_md_ratio(e, 'peak_rss_mib')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report.py RESULT.json   (written by compare.py --out)")
    with open(sys.argv[1], encoding="utf-8") as f:
        print(markdown(json.load(f)))
