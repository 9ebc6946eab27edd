"""Resume: choose a checkpoint all ranks agree on, check it fits this run, and load it.

Choice (``checkpoint.resume``): ``auto`` takes the newest ``step_XXXXXXXX`` of the run dir whose
manifest verifies (every file's size and checksum; the ranks hash a share each), reporting each
corrupt or partial one by name and falling back to the previous; ``never`` starts fresh; a path
(a checkpoint dir, or a run/checkpoints dir meaning its newest) must verify, else the run stops
with a clear error. Rank 0 reads the directory and the manifest and broadcasts, so all ranks
decide alike.

The DCP shard files, nearly all of a checkpoint's bytes, are hashed while the load reads them
rather than before (each byte read once: ``verify(defer=True)``, ``storage.SafeReader``); the
other files (meta, RNG states, DCP's index) before. A shard that fails its checksum during the load
fails it on every rank (``CorruptCheckpoint``): ``auto`` then loads the newest older checkpoint
that verifies wholly beforehand (``after_corrupt_load``).

Loading is refused, with the mismatch named, when the checkpoint belongs to another model or
dataset, when its data position does not fit this run's global batch, or when the strategy says it
cannot load it (``Strategy.check_checkpoint``: another model's shapes, another format's optimizer
state). What to load and how is the strategy's business (``Strategy.load_checkpoint``).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Set

from dist_train.checkpoint import checksum, decode, digest, layout, retention
from dist_train.checkpoint.files import CheckpointFiles
from dist_train.checkpoint.storage import CorruptCheckpoint
from dist_train.env.seed import seed_everything, set_rng_state

log = logging.getLogger("dist_train.checkpoint")

# Config entries that define the model's function and shapes, or the data it was trained on.
# (model.dropout may change on resume; train.* may change too, e.g. a longer schedule.)
IDENTITY_SKIP = {"model.dropout"}


def _is_shard(rel: str) -> bool:
    """A DCP shard file of a checkpoint (manifest path): hashed while it is loaded."""
    return rel.startswith(layout.DCP_DIR + "/") and rel.endswith(".distcp") and rel.count("/") == 1


def _shard_name(rel: str) -> str:
    return rel[len(layout.DCP_DIR) + 1:]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read: the run fails (exit 1)."""


class CheckpointRefused(CheckpointError):
    """The requested checkpoint does not fit this run: a usage error (exit 2), no traceback."""


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def identity(config: Dict[str, Any]) -> Dict[str, Any]:
    """The entries of a resolved config that a checkpoint must match."""
    flat = _flatten({"model": config.get("model", {}), "data": {"name": config.get("data", {}).get("name")}})
    return {k: v for k, v in flat.items() if k not in IDENTITY_SKIP}


def grouping(config: Dict[str, Any]) -> Dict[str, Any]:
    """The entries of a resolved config that decide the optimizer's param groups (which parameters
    train, and how they are split): an optimizer state loads only into the same groups."""
    train, model = config.get("train", {}), config.get("model", {})
    return {"model.freeze": list(model.get("freeze") or []), "train.lr_scale": dict(train.get("lr_scale") or {}),
            "train.decay_norm_and_bias": bool(train.get("decay_norm_and_bias", True) or not train.get("weight_decay"))}


def other_optimizer(stored: Dict[str, Any], current: Dict[str, Any]) -> Optional[str]:
    """Why an optimizer state saved under the config ``stored`` does not load into the optimizer of
    ``current`` (None: it does). Adam and AdamW keep the same state (moments and step), SGD with
    momentum a momentum buffer, SGD without momentum none: a state loads into an optimizer of the
    same kind, or into SGD without momentum from SGD with it (the buffer is then unused). A config
    without a train section (an older checkpoint of a fit() run? never written): not checked."""
    def kind(config: Dict[str, Any]) -> Optional[str]:
        train = config.get("train") or {}
        name = train.get("optimizer")
        if name in ("adam", "adamw"):
            return "adam"
        if name == "sgd":
            return "sgd+momentum" if float(train.get("momentum") or 0) > 0 else "sgd"
        return None

    there, here = kind(stored), kind(current)
    if there is None or here is None or there == here or (there, here) == ("sgd+momentum", "sgd"):
        return None
    def describe(config: Dict[str, Any]) -> str:
        train = config["train"]
        return f"train.optimizer={train['optimizer']}" + (
            f" with train.momentum={train.get('momentum')}" if train["optimizer"] == "sgd" else "")

    return f"it was saved with {describe(stored)} and this run has {describe(current)}"


META_KEYS = ("step", "train_state", "world_size", "micro_global_batch", "grad_accum_steps", "strategy")


def _epoch_end(meta: Dict[str, Any]) -> int:
    """Where the epoch of a checkpoint's training set ends (its last incomplete global batch dropped)."""
    return meta["train_samples"] // meta["micro_global_batch"] * meta["micro_global_batch"]


def read_meta(path: str) -> Dict[str, Any]:
    """A checkpoint's meta.json; CheckpointRefused naming the checkpoint when it is not usable."""
    name = os.path.basename(os.path.normpath(path))
    try:
        with open(os.path.join(path, layout.META), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointRefused(f"checkpoint {name}: meta.json cannot be read: {type(exc).__name__}: "
                                f"{str(exc)[:200]}") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing or not isinstance(meta.get("train_state"), dict):
        raise CheckpointRefused(f"checkpoint {name}: meta.json lacks {', '.join(missing) or 'a train_state mapping'}")
    return meta


def checkpoints_under(path: str) -> Optional[str]:
    """The checkpoints dir that ``path`` is (or holds, as a run dir), when it is not a checkpoint
    itself and holds step_XXXXXXXX checkpoints; else None."""
    if os.path.isfile(os.path.join(path, layout.MANIFEST)) or layout.parse_step(path) is not None:
        return None
    for base in (os.path.join(path, layout.CHECKPOINTS), path):
        if layout.committed(base):
            return base
    return None


def resolve_path(path: str) -> str:
    """A checkpoint dir as given, or the newest checkpoint of a checkpoints dir or run dir (by its
    step: ``latest`` may be stale, e.g. after a crash between a commit's rename and its update)."""
    base = checkpoints_under(path)
    if base is not None:
        return layout.committed(base)[0][1]
    if os.path.isfile(os.path.join(path, layout.MANIFEST)) or layout.parse_step(path) is not None:
        return path
    raise CheckpointRefused(f"checkpoint.resume={path}: not a checkpoint (no manifest.json) and no "
                            f"step_XXXXXXXX checkpoint under it")


class Restorer:
    """The resume half of the CheckpointManager (it shares the manager's group and strategy)."""

    def __init__(self, manager, seed: int):
        self.m = manager
        self.seed = seed
        self.unusable: Dict[str, List[str]] = {}
        self.deferred: Dict[str, Dict[str, dict]] = {}  # checkpoint -> shard files to hash while loading

    # --- choosing ----------------------------------------------------------------------------

    def verify(self, path: str, defer: bool = False) -> List[str]:
        """Collective: every problem of checkpoint ``path`` ([] = verified), the same on all ranks.

        ``defer``: the DCP shard files (nearly all of a checkpoint's bytes) are only checked for
        size here; their checksums are taken while the load reads them (``load``), so a resume
        reads each byte once. Kept in ``deferred`` until then."""
        g = self.m.group
        head = None
        if g.rank == 0:
            try:
                files = layout.read_manifest(path)["files"]
                head = (files, layout.check_sizes(path, files))
            except (ValueError, OSError) as exc:
                head = (None, [str(exc)])
        files, errors = g.broadcast(head)
        if errors:
            return errors
        later = {rel: files[rel] for rel in files if _is_shard(rel) and checksum.algorithm_of(files[rel])} if defer else {}
        names = sorted(rel for rel in files if rel not in later)
        try:
            mine = layout.check_hashes(path, files, names[g.rank::g.world])
        except OSError as exc:
            mine = [f"unreadable: {exc}"]
        errors = [e for errs in g.all_gather(mine) for e in errs]
        if not errors and later:
            self.deferred[path] = later
        return errors

    def choose(self) -> Optional[str]:
        mode, g = self.m.cfg.resume, self.m.group
        if mode == "never":
            return None
        if mode != "auto":
            resolved: Any = None
            if g.rank == 0:
                try:
                    base = checkpoints_under(mode)
                    resolved = ("base", base) if base is not None else ("ok", resolve_path(mode))
                except (CheckpointRefused, OSError) as exc:
                    resolved = ("error", str(exc))
            status, value = g.broadcast(resolved)
            if status == "base":  # a run dir: its newest checkpoint that verifies, as auto takes
                chosen = self.newest_verified(defer=True, base=value)
                if chosen is None:
                    raise CheckpointRefused(f"checkpoint.resume={mode}: no checkpoint under {value} verifies")
                return chosen
            if status != "ok":
                raise CheckpointRefused(value)
            errors = self.verify(value, defer=True)
            if errors:
                raise CheckpointRefused(f"checkpoint.resume={mode}: {value} does not verify: " + "; ".join(errors[:5]))
            return value
        return self.newest_verified(defer=True)

    def newest_verified(self, defer: bool = False, below: Optional[int] = None,
                        base: Optional[str] = None) -> Optional[str]:
        """Collective: the newest checkpoint of the run dir (or of checkpoints dir ``base``; older
        than step ``below``, if given) that verifies (None: none does)."""
        g, own = self.m.group, base is None
        base = base or self.m.dir
        candidates = None
        if g.rank == 0:
            try:
                candidates = [p for s, p in layout.committed(base) if below is None or s < below]
            except OSError as exc:
                candidates = str(exc)
        candidates = g.broadcast(candidates)
        if isinstance(candidates, str):
            raise CheckpointError(f"cannot list checkpoints in {base}: {candidates}")
        for path in candidates:
            errors = self.verify(path, defer)
            if not errors:
                return path
            self._skip(path, errors)
        if candidates and below is None and own:
            # Work exists but cannot be trusted: a run that started over would overwrite its
            # history (metrics.jsonl, newer checkpoints), and a read error that has passed (a
            # network filesystem) would look the same. Nothing is moved; the user decides.
            newest = os.path.basename(candidates[0])
            raise CheckpointError(
                f"no checkpoint under {self.m.dir} verifies ({len(candidates)} found; the newest, {newest}: "
                f"{'; '.join(self.unusable.get(candidates[0], [])[:3])}). This run stops rather than start from "
                f"scratch over them, and nothing was moved or deleted: `python -m dist_train.checkpoint inspect "
                f"{self.m.dir}` shows each one's problem. After a storage problem that has passed, run the same "
                f"command again; to start from scratch, move {self.m.dir} away or set checkpoint.resume=never")
        return None

    def _skip(self, path: str, errors: List[str]) -> None:
        self.unusable[path] = errors
        if self.m.group.rank == 0:
            log.warning("checkpoint %s is corrupt or incomplete, skipping it for an older one: %s",
                        os.path.basename(path), "; ".join(errors[:5]))

    def tidy(self, chosen: Optional[str], step: int) -> None:
        """Rank 0: remove staging leftovers; move checkpoints newer than the resumed step (corrupt
        ones, or an abandoned timeline's) out of the way so this run never mixes timelines."""
        for name in retention.remove_stale(self.m.dir):
            log.warning("removed %s, left by a run that stopped before committing it", name)
        for s, path in layout.committed(self.m.dir):
            if s > step and (chosen is None or os.path.abspath(path) != os.path.abspath(chosen)):
                new = retention.set_aside(path, "corrupt" if path in self.unusable else "superseded")
                log.warning("moved %s aside to %s: it is newer than the step this run resumes from (%d)",
                            os.path.basename(path), new, step)
        if chosen and os.path.dirname(os.path.abspath(chosen)) == os.path.abspath(self.m.dir):
            if layout.read_latest(self.m.dir) != os.path.basename(chosen):  # a rewrite costs two fsyncs
                layout.set_latest(self.m.dir, os.path.basename(chosen))
        elif os.path.exists(os.path.join(self.m.dir, layout.LATEST)) and not layout.committed(self.m.dir):
            os.remove(os.path.join(self.m.dir, layout.LATEST))

    # --- loading ------------------------------------------------------------------------------

    def resume(self, state) -> Optional[str]:
        chosen = self.choose()
        while True:
            meta = None
            if chosen:
                meta = read_meta(chosen)
                files = CheckpointFiles(chosen, self.m.group.pg)  # (the check and the load share its index)
                self.check_fits(chosen, meta, files)
            self._tidy(chosen, meta["step"] if meta else 0)
            if not chosen:
                break
            try:
                self.load(chosen, meta, state, files)
                break
            except CorruptCheckpoint as exc:  # (on every rank alike)
                chosen = self.after_corrupt_load(chosen, exc.problems)
        if chosen:
            own = os.path.dirname(os.path.abspath(chosen)) == os.path.abspath(self.m.dir)
            # This job's MLflow run goes on; a checkpoint of another run dir (checkpoint.resume=PATH)
            # starts this job's own, rather than adding to that job's run.
            self.m.resumed_run_id = meta.get("mlflow_run_id") if own else None
            if self.m.rank0 and self.m.cfg.sha256 and own:
                # Its SHA-256 checksums, if the attempt that wrote it ended before they were all in
                # (or an older release wrote it): rank 0 reads it back once, in the background.
                try:
                    complete = all("sha256" in e for e in layout.read_manifest(chosen)["files"].values())
                except ValueError:
                    complete = True
                if not complete:
                    digest.submit(chosen)
            if self.m.rank0:
                log.info("resumed from %s: step %d, epoch %d, sample position %d (%s, world size %d -> %s, %d)",
                         chosen, state.step, state.epoch, state.position, meta["strategy"], meta["world_size"],
                         self.m.strategy.name, self.m.world)
        return chosen

    def _tidy(self, chosen: Optional[str], step: int) -> None:
        if self.m.rank0:
            try:
                self.tidy(chosen, step)
            except OSError as exc:  # housekeeping only: never leave the other ranks waiting in the load
                log.warning("could not tidy %s: %s", self.m.dir, exc)

    def after_corrupt_load(self, path: str, problems: List[str]) -> str:
        """Collective: a checkpoint whose shard files failed their checksums while it was being
        loaded. ``checkpoint.resume=PATH`` refuses it; ``auto`` goes on with the newest older
        checkpoint that verifies, this time wholly before it is loaded. With none, the run stops:
        the corrupt checkpoint's state may be partly in the model already (a GPU's or a shard's
        tensors are filled in place), so it cannot start from scratch; and, as when no checkpoint
        verifies before loading, nothing is moved (a read error that has passed looks the same,
        and a later run must not start over the run's history unasked). With an older one, the
        corrupt checkpoint is moved aside by the next ``tidy``."""
        mode = self.m.cfg.resume
        name = os.path.basename(os.path.normpath(path))
        if mode != "auto":
            raise CheckpointRefused(f"checkpoint.resume={mode}: {path} does not verify: " + "; ".join(problems[:5]))
        self._skip(path, problems)
        older = self.newest_verified(below=layout.parse_step(path))
        if older is None:
            raise CheckpointError(
                f"checkpoint {name} is corrupt ({'; '.join(problems[:5])}): found while it was being loaded, and no "
                f"older checkpoint under {self.m.dir} verifies. Part of its state may have been loaded already, so "
                f"this run stops instead of starting from scratch, and nothing was moved or deleted: `python -m "
                f"dist_train.checkpoint inspect {self.m.dir}` shows each one's problem. After a storage problem that "
                f"has passed, run the same command again; to start from scratch, move {self.m.dir} away or set "
                f"checkpoint.resume=never")
        return older

    def other_train_set(self, meta: Dict[str, Any]) -> bool:
        """The checkpoint was trained on a training set of another length than this run's."""
        stored = meta.get("train_samples")
        return stored is not None and self.m.train_samples is not None and stored != self.m.train_samples

    @staticmethod
    def at_epoch_end(meta: Dict[str, Any]) -> bool:
        """The checkpoint stopped after the last global batch of its epoch (its next one starts a new
        epoch, from position 0: any global batch size and any training set can take it up)."""
        position = meta["train_state"]["position"]
        return meta.get("train_samples") is not None and position > 0 and position >= _epoch_end(meta)

    def check_fits(self, path: str, meta: Dict[str, Any], files: Optional[CheckpointFiles] = None) -> None:
        """Refuse (same verdict on every rank) a checkpoint of another model, dataset or batch."""
        name = os.path.basename(os.path.normpath(path))
        stored, current = identity(meta.get("config", {})), identity(self.m.config)
        for key in sorted(set(stored) | set(current)):
            if stored.get(key) != current.get(key):
                raise CheckpointRefused(
                    f"checkpoint {name} was written for {key}={stored.get(key)!r} but this run has {key}="
                    f"{current.get(key)!r}; resume it with the same model and dataset, or start fresh "
                    f"(checkpoint.resume=never or another run.dir)")
        if self.m.cfg.load_optimizer:
            problem = self.other_groups(meta)
            if problem:
                raise CheckpointRefused(
                    f"checkpoint {name}'s optimizer state belongs to other param groups: {problem}. Resume with the "
                    "same settings, or set checkpoint.load_optimizer=false to go on from its weights, step, data "
                    "position and schedule with a fresh optimizer state")
            problem = other_optimizer(meta.get("config", {}), self.m.config)
            if problem:
                raise CheckpointRefused(
                    f"checkpoint {name}'s optimizer state cannot be loaded into this run's optimizer: {problem}. "
                    "Resume with the checkpoint's optimizer settings, or set checkpoint.load_optimizer=false to go on "
                    "from its weights, step, data position and schedule with a fresh optimizer state")
        position, gbs = meta["train_state"]["position"], self.m.micro_global_batch
        stored_samples, samples = meta.get("train_samples"), self.m.train_samples
        if self.other_train_set(meta):  # (an older checkpoint does not say: not checked)
            if 0 < position < _epoch_end(meta):
                raise CheckpointRefused(
                    f"checkpoint {name} stopped at sample {position} of an epoch over {stored_samples} training "
                    f"samples, and this run's training set has {samples}: the rest of that epoch cannot be drawn "
                    f"(its order is a permutation of the old indices: samples would repeat or be skipped). Resume "
                    f"with the same training data, or start fresh from its weights (model.init_from with "
                    f"`python -m dist_train.checkpoint export`, or checkpoint.resume=never)")
            if self.m.rank0:
                log.warning("checkpoint %s was trained on %d samples, this run's training set has %d: "
                            "the next epoch draws from the new set", name, stored_samples, samples)
        if self.at_epoch_end(meta):
            position = 0  # (the resume starts the next epoch: any global batch divides it)
        if position % gbs:
            raise CheckpointRefused(
                f"checkpoint {name} stopped at sample {position} of its epoch, which this run's global micro-batch "
                f"of {gbs} samples (world size x data.batch_size) does not divide; resume with world size x "
                f"data.batch_size = {meta['micro_global_batch']} (e.g. 2 ranks x {meta['micro_global_batch'] // 2} "
                f"or 1 x {meta['micro_global_batch']})")
        if gbs * self.m.grad_accum_steps != meta["micro_global_batch"] * meta["grad_accum_steps"] and self.m.rank0:
            log.warning("checkpoint %s was trained with %d samples per optimizer step, this run uses %d",
                        name, meta["micro_global_batch"] * meta["grad_accum_steps"], gbs * self.m.grad_accum_steps)
        try:
            problem = self.m.strategy.check_checkpoint(files or CheckpointFiles(path), meta, self.m.cfg.load_optimizer)
        except Exception as exc:  # noqa: BLE001  (an index that does not unpickle, or lies)
            raise CheckpointRefused(f"checkpoint {name}: its model index cannot be read: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
        if problem:
            raise CheckpointRefused(f"checkpoint {name} cannot be loaded: {problem}")

    def other_groups(self, meta: Dict[str, Any]) -> Optional[str]:
        """How the checkpoint's optimizer param groups differ from this run's (None: the same). Its
        recorded groups (parameter names) against this optimizer's; a checkpoint without them (an
        older release, an optimizer of another origin): the config keys that decide them."""
        there, here = grouping(meta.get("config", {})), grouping(self.m.config)
        keys = ", ".join(f"{k}={there[k]!r} there, {here[k]!r} here" for k in there if there[k] != here[k])
        stored, current = meta.get("param_groups"), self.m.strategy.param_group_names()
        if stored is None or current is None:
            return keys or None
        if stored == current:
            return None  # (e.g. only a multiplier of train.lr_scale changed: this run's rates apply)
        sizes = (f"{len(stored)} group(s) of {[len(g) for g in stored]} parameters there, {len(current)} of "
                 f"{[len(g) for g in current]} here")
        return f"{keys} ({sizes})" if keys else f"other trainable parameters or another split ({sizes})"

    def rollback(self, state) -> int:
        """Collective: back to the newest verified checkpoint's weights, optimizer, schedule and
        step, keeping ``state``'s data position (so training goes on past the batches that failed).
        Returns the step rolled back to."""
        chosen = self.newest_verified(below=state.step + 1)
        if chosen is None:
            raise CheckpointError(f"rollback: no verified checkpoint under {self.m.dir} to roll back to")
        meta = read_meta(chosen)
        files = CheckpointFiles(chosen, self.m.group.pg)
        strategy = self.m.strategy
        # The optimizer's state too, unless the checkpoint's cannot be loaded here (the checkpoint
        # this run resumed from with checkpoint.load_optimizer=false: another strategy's format):
        # then its weights and schedule, and the optimizer starts afresh, as at that resume.
        with_optimizer = strategy.check_checkpoint(files, meta, True) is None and self.other_groups(meta) is None
        if not with_optimizer:
            problem = strategy.check_checkpoint(files, meta, False)
            if problem:
                raise CheckpointError(f"rollback: {os.path.basename(chosen)} cannot be loaded: {problem}")
            strategy.reset_optimizer_state()  # (the moments of the diverged steps must not stay)
        settings = strategy.optimizer_settings()
        strategy.load_checkpoint(files, meta, with_optimizer)
        strategy.keep_optimizer_settings(settings)  # (this run's lr, weight decay and schedule, as at a resume)
        state.step = meta["step"]
        if self.m.rank0:
            log.warning("rolled back to %s (step %d); the data continues at sample %d of epoch %d",
                        os.path.basename(chosen), state.step, state.position, state.epoch)
        return state.step

    def load(self, path: str, meta: Dict[str, Any], state, files: Optional[CheckpointFiles] = None) -> None:
        later = self.deferred.pop(path, {})
        files = files or CheckpointFiles(path, self.m.group.pg)
        files.expected = {_shard_name(rel): e for rel, e in later.items()}
        settings = self.m.strategy.optimizer_settings()
        self.m.strategy.load_checkpoint(files, meta, self.m.cfg.load_optimizer)
        changed = self.m.strategy.keep_optimizer_settings(settings)
        if changed and self.m.rank0:
            log.warning("resumed with this run's optimizer settings, not the checkpoint's: %s (the schedule's "
                        "position and the optimizer's state are the checkpoint's)",
                        ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(changed.items())))
        if later:
            self.check_rest(path, later, files.hashed)
        state.load_state_dict(meta["train_state"])
        if self.at_epoch_end(meta):  # (what the loop would do first; another set's epoch may go further)
            state.epoch, state.position = state.epoch + 1, 0
        state.resumed_from_step = meta["step"]
        self.restore_rng(path, meta)

    def check_rest(self, path: str, later: Dict[str, dict], hashed: Set[str]) -> None:
        """Collective, after the load: hash the deferred shard files no rank read whole (a strategy
        that loads through its own reader, only the model's items of a file...); raises
        ``CorruptCheckpoint`` on every rank when any file does not match."""
        g = self.m.group
        seen = set(hashed).union(*g.all_gather(sorted(hashed))) if g.world > 1 else set(hashed)
        rest = sorted(rel for rel in later if _shard_name(rel) not in seen)
        if not rest:
            return
        try:
            mine = layout.check_hashes(path, later, rest[g.rank::g.world])
        except OSError as exc:
            mine = [f"unreadable: {exc}"]
        errors = [e for errs in g.all_gather(mine) for e in errs]
        if errors:
            raise CorruptCheckpoint(f"the checkpoint's files do not match its manifest: {'; '.join(errors[:5])}", errors)

    def restore_rng(self, path: str, meta: Dict[str, Any]) -> None:
        """Each rank gets back its own RNG streams; at another world size they cannot correspond,
        so each rank is re-seeded from (seed, step, rank) instead."""
        if meta["world_size"] == self.m.world:
            try:
                with open(os.path.join(path, layout.rng_file(self.m.rank)), "rb") as f:
                    rng = decode.load_item(f)  # (tensors, numbers, strings: no code runs)
                set_rng_state(rng)
            except Exception as exc:  # noqa: BLE001
                raise CheckpointRefused(f"checkpoint {os.path.basename(path)}: the RNG state of rank {self.m.rank} "
                                        f"cannot be read: {type(exc).__name__}: {str(exc)[:200]}") from None
            return
        seed_everything((self.seed * 1_000_003 + meta["step"] * 1009 + self.m.rank) % 2**63)
        if self.m.rank0:
            log.info("world size changed (%d -> %d): RNG streams re-seeded from (seed, step, rank)",
                     meta["world_size"], self.m.world)
