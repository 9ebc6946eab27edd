"""Checkpoint tools, offline (no process group, any machine):

    python -m dist_train.checkpoint inspect PATH [--json] [--sha256]
        PATH: a checkpoint dir, or a run dir / checkpoints dir (then every checkpoint in it).
        Prints step, data position, strategy, world size, files and the verification result.
        --sha256 also checks each file against the SHA-256 its manifest entry records (added after
        the commit, see digest.py), as an outside tool would.
        Exit 0 when every checkpoint shown verifies, 1 otherwise.

    python -m dist_train.checkpoint export PATH OUT.safetensors   (or OUT.pt / OUT.pth)
        Writes the consolidated model weights (whatever strategy and world size wrote them) as one
        safetensors file that plain PyTorch loads: ``model.load_state_dict(safetensors.torch.load_file(OUT))``;
        a .pt / .pth name gets torch.save's format (``model.load_state_dict(torch.load(OUT))``).
        PATH must verify. Exit 0 on success, 1 if it does not verify, 2 on bad usage (another suffix).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from dist_train.checkpoint import checksum, layout, storage
from dist_train.checkpoint.export import export_run, suffix_problem
from dist_train.checkpoint.restore import CheckpointError


def _checkpoints(path: str) -> List[str]:
    if os.path.isfile(os.path.join(path, layout.MANIFEST)) or layout.parse_step(path) is not None:
        return [path]
    for base in (os.path.join(path, layout.CHECKPOINTS), path):
        found = layout.committed(base)
        if found:
            return [p for _s, p in sorted(found)]
    return []


def describe(path: str, sha256: bool = False) -> dict:
    """Everything ``inspect`` shows about one checkpoint, as a dict (``sha256``: the files are
    checked against their recorded SHA-256 too)."""
    errors = layout.verify(path)
    info = {"path": path, "verified": not errors, "errors": errors}
    try:
        entries = layout.read_manifest(path)["files"]
        info["sha256_recorded"] = sum("sha256" in e for e in entries.values())
        if sha256 and not errors:
            info["sha256_checked"] = 0
            for rel, entry in sorted(entries.items()):
                if "sha256" in entry:
                    info["sha256_checked"] += 1
                    found = checksum.hash_file(os.path.join(path, rel), "sha256")
                    if found["sha256"] != entry["sha256"]:
                        errors.append(f"{rel}: sha256 {found['sha256'][:12]}... != {entry['sha256'][:12]}... "
                                      "in the manifest")
            info["verified"] = not errors
    except ValueError:
        pass  # (verify has said why)
    try:
        with open(os.path.join(path, layout.META), encoding="utf-8") as f:
            meta = json.load(f)
        ts = meta.get("train_state", {})
        info.update(step=meta.get("step"), epoch=ts.get("epoch"), position=ts.get("position"),
                    samples_seen=ts.get("samples_seen"), kind=meta.get("kind"), strategy=meta.get("strategy"),
                    world_size=meta.get("world_size"), mlflow_run_id=meta.get("mlflow_run_id"),
                    model=meta.get("config", {}).get("model", {}).get("name"),
                    dataset=meta.get("config", {}).get("data", {}).get("name"), torch_version=meta.get("torch_version"))
    except (OSError, ValueError) as exc:
        info["meta_error"] = str(exc)
    try:
        info["files"] = {rel: e["size"] for rel, e in layout.read_manifest(path)["files"].items()}
    except ValueError:
        info["files"] = {rel: os.path.getsize(os.path.join(path, rel)) for rel in layout.list_files(path)}
    try:
        shapes = storage.tensor_shapes(os.path.join(path, layout.DCP_DIR))
        info["parameters"] = sum(_numel(s) for s, _d in shapes.values())
        info["tensors"] = {k: list(s) for k, (s, _d) in shapes.items()}
    except Exception as exc:  # noqa: BLE001  (inspect shows whatever it can)
        info["dcp_error"] = str(exc)
    return info


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _print(info: dict) -> None:
    print(f"{info['path']}")
    for key in ("step", "epoch", "position", "samples_seen", "kind", "strategy", "world_size", "model", "dataset",
                "parameters", "mlflow_run_id", "torch_version"):
        if key in info:
            print(f"  {key:14s} {info[key]}")
    print(f"  files ({len(info['files'])}, {sum(info['files'].values()) / 2**20:.2f} MiB):")
    for rel, size in sorted(info["files"].items()):
        print(f"    {rel:40s} {size:>12d}")
    if "sha256_recorded" in info:
        checked = info.get("sha256_checked")
        print(f"  sha256         recorded for {info['sha256_recorded']} of {len(info['files'])} files"
              + ("" if checked is None else f"; {checked} checked (--sha256), "
                 + ("every one matches" if info["verified"] else "see the errors below")))
    if info["verified"]:
        print("  verification   OK (every file's size and checksum match manifest.json: XXH3-128, "
              "or SHA-256 in a format-1 manifest)")
    else:
        print("  verification   FAILED")
        for err in info["errors"]:
            print(f"    {err}")


def export(path: str, out: str) -> int:
    """Write the consolidated model weights of ``path`` to ``out`` (safetensors)."""
    try:
        info = export_run(path, out)
    except CheckpointError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"wrote {info['tensors']} tensors ({info['parameters']} parameters) of step {info['step']} to {out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dist_train.checkpoint", description="inspect or export checkpoints")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("inspect", help="step, strategy, world size, files and verification of checkpoints")
    pi.add_argument("path")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.add_argument("--sha256", action="store_true", help="also check every file against its recorded SHA-256")
    pe = sub.add_parser("export", help="consolidated model weights as one file: OUT.safetensors, or OUT.pt / "
                                       "OUT.pth in torch.save's format")
    pe.add_argument("path")
    pe.add_argument("out")
    args = p.parse_args(argv)
    found = _checkpoints(args.path)
    if not found:
        print(f"no checkpoint at {args.path}", file=sys.stderr)
        return 2
    if args.cmd == "export":
        problem = suffix_problem(args.out)
        if problem:
            print(f"export: {problem}", file=sys.stderr)
            return 2
        return export(args.path, args.out)
    infos = [describe(path, sha256=getattr(args, "sha256", False)) for path in found]
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
    else:
        for info in infos:
            _print(info)
    return 0 if all(i["verified"] for i in infos) else 1


if __name__ == "__main__":
    from dist_train.env.shutdown import exit_process

    exit_process(main())
