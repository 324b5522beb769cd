"""A run directory's finished stages and the trust chain between them.

Every stage of a run lives in `<run_dir>/<stage>/` and is finished once its `done.json` (the
record) is there. A record holds the training config the stage was trained under, the hash of what
its result depends on (`config_hash`: data, model, its settings, optimiser, seed, precision and the
exact upstream checkpoint), and its checkpoint's path *relative to the stage directory* with that
file's sha256. So a run directory can be moved, copied and shared, and a reader can verify, from the
records alone, that the chain of stages (``stages.chain``) is the one that was trained together:
each checkpoint's bytes match its record, and each record names its upstream's current checkpoint. Checkpoints are loaded with
`weights_only=True`: a checkpoint is data, never code.

A run may also use another run's finished stages *by reference* (a sweep job reusing the shared
first stage: `training.run` with `reuse_runs=`): `<run_dir>/references.json` maps such a stage to
the run directory that holds it, and `stage_dir` resolves it there. Nothing is copied or moved, and the
records and hashes are checked across the reference exactly as within one directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from ups_lightning.atomic import atomic_write_json, sha256_file  # noqa: F401 (sha256_file: part of this API)
from ups_lightning.config import fill_later_keys, model_overrides, neutral_later_keys, stage_optim
from ups_lightning.errors import UserError, command
from ups_lightning.stages import STAGE_ORDER, UPSTREAM, chain, get_stage, with_role

DONE = "done.json"
OVERRIDES = "overrides.json"    # the command-line overrides of the run's last training command
REFERENCES = "references.json"  # stage -> the run directory (relative to this one) that holds it
RECORD_KEYS = ("stage", "config_hash", "best_ckpt", "ckpt_sha256")
RECORD_NUMBERS = ("wall_clock_s", "prep_s", "best_val_nrmse", "trivial_val_nrmse")   # numbers (or null) when present


def stage_dir(run_dir: str | Path, name: str) -> Path:
    """`<run_dir>/<name>/`; for a stage the run uses by reference (and does not hold itself), that
    stage's directory in the run that holds it."""
    own = Path(run_dir) / name
    if own.exists():
        return own
    ref = references(run_dir).get(name)
    return own if ref is None else Path(run_dir) / ref / name


def references(run_dir: str | Path) -> Dict[str, str]:
    """The run's stages held by other runs: stage -> that run's directory, relative to this one."""
    path = Path(run_dir) / REFERENCES
    if not path.is_file():
        return {}
    try:
        refs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable reference file ({type(exc).__name__}: {exc}). Delete it "
                        "and rerun the training command: the referenced stages are found again.") from None
    if not isinstance(refs, dict) or not all(k in STAGE_ORDER and isinstance(v, str) for k, v in refs.items()):
        raise UserError(f"{path}: expected a JSON object mapping stage names {list(STAGE_ORDER)} to run "
                        "directories; it was edited. Delete it and rerun the training command.")
    return refs


def add_reference(run_dir: str | Path, name: str, holder: str | Path) -> None:
    """Record that this run uses stage `name` of the run `holder` (the directory that holds it
    itself, so a reference never points at another reference)."""
    holder = stage_dir(holder, name).parent
    refs = references(run_dir)
    refs[name] = os.path.relpath(holder.resolve(), Path(run_dir).resolve())
    atomic_write_json(Path(run_dir) / REFERENCES, refs)


def drop_reference(run_dir: str | Path, name: str) -> None:
    """The run now holds stage `name` itself."""
    refs = references(run_dir)
    if refs.pop(name, None) is not None:
        atomic_write_json(Path(run_dir) / REFERENCES, refs)


def latents_dir(run_dir: str | Path) -> Path:
    """The latent cache lives beside the encoder stage that made it, so runs sharing an encoder
    share its encodings."""
    return stage_dir(run_dir, with_role("encoder")[0]).parent / "latents"


# --- the command that fixes a run ----------------------------------------------------------------
def save_overrides(run_dir: Path, overrides: Sequence[str]) -> None:
    atomic_write_json(run_dir / OVERRIDES, list(overrides))


def train_command(run_dir: str | Path, cfg: Optional[DictConfig] = None,
                  overrides: Optional[Sequence[str]] = None, stage: str = "all") -> str:
    """`python -m ups_lightning.train ... stage=STAGE` keeping every override the user gave (from the
    live command, else the run's saved overrides, else the config's names and run_dir)."""
    if overrides is None:
        path = Path(run_dir) / OVERRIDES
        try:
            overrides = json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError, UnicodeDecodeError):
            overrides = None
    if overrides is None:
        overrides = []
        if cfg is not None:
            if cfg.get("experiment"):
                overrides.append(f"experiment={cfg.experiment}")
            overrides += [f"data={cfg.data.name}", *model_overrides(cfg.model.name)]
    # the run's directory as it is now: a copied or moved run is named where it lies, not where it was made
    kept = [shlex.quote(o) for o in overrides
            if not o.lstrip("+").startswith(("stage=", "ckpt_path=", "run_dir="))]
    return " ".join([command("ups_lightning.train"), *kept, shlex.quote(f"run_dir={run_dir}"), f"stage={stage}"])


# --- records -------------------------------------------------------------------------------------
def read_record(run_dir: str | Path, name: str) -> Optional[Dict[str, Any]]:
    """The stage's record, None when it has none; a record that is not one (truncated, edited,
    not UTF-8, missing keys) is a UserError naming the file."""
    path = stage_dir(run_dir, name) / DONE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable stage record ({type(exc).__name__}: {exc}); it was "
                        "truncated or edited. Delete the stage directory and retrain the stage.") from None
    missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or not isinstance(record.get(k), str)]
    missing += [k for k in RECORD_NUMBERS if isinstance(record, dict) and k in record
                and (isinstance(record[k], bool) or not isinstance(record[k], (int, float, type(None))))]
    if isinstance(record, dict) and not isinstance(record.get("learned"), (bool, type(None))):
        missing.append("learned")
    if missing:
        raise UserError(f"{path}: stage record lacks {missing} (or holds them with the wrong type); it was "
                        "edited or written by an older version. Delete the stage directory and retrain it.")
    return record


def checkpoint_file(run_dir: str | Path, name: str, record: Dict[str, Any]) -> Path:
    """The record's checkpoint, resolved inside the stage directory (relative paths: a run directory
    can move). A path leaving the stage directory is refused."""
    sdir = stage_dir(run_dir, name).resolve()
    rel = Path(record["best_ckpt"])
    if rel.is_absolute():   # records of older versions stored absolute paths: keep the tail
        rel = Path(*rel.parts[-2:])
    path = (sdir / rel).resolve()
    if sdir not in path.parents:
        raise UserError(f"{stage_dir(run_dir, name) / DONE}: best_ckpt={record['best_ckpt']!r} points "
                        "outside its stage directory; a record only ever names its own checkpoint.")
    return path


def verify_checkpoint(run_dir: str | Path, name: str, record: Dict[str, Any], fix: str) -> Path:
    """The checkpoint of a finished stage, after checking its bytes against the record."""
    path = checkpoint_file(run_dir, name, record)
    if not path.is_file():
        raise UserError(f"stage '{name}' of {run_dir}: its checkpoint {path} is missing. Retrain with: {fix}")
    digest = sha256_file(path)
    if digest != record["ckpt_sha256"]:
        raise UserError(f"stage '{name}' of {run_dir}: checkpoint {path} does not match its record "
                        f"(sha256 {digest[:12]}…, recorded {record['ckpt_sha256'][:12]}…): it was changed "
                        f"after training. Retrain with: {fix}")
    return path


def stage_config_hash(cfg: DictConfig, name: str, upstream: Optional[Dict[str, Any]],
                      init_sha: Optional[str] = None) -> str:
    """What a stage's result depends on: data, model, its own settings, the optimiser settings it
    trains with, seed, precision, the exact upstream checkpoint it was trained on and, fine-tuned, the
    checkpoint it started from (``init_sha``: its record's; else read from the ``init_from`` run). Keys
    added later are left out at their neutral values (config.neutral_later_keys): older runs keep their hash."""
    relevant = {
        "stage": name,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "settings": OmegaConf.to_container(cfg.stages[name], resolve=True),
        "optim": stage_optim(cfg, name),
        "seed": cfg.seed,
        "precision": cfg.trainer.precision,
        "upstream": upstream["ckpt_sha256"] if upstream else None,
    }
    init = OmegaConf.select(cfg, "init_from")
    if init:    # the weights it starts from (their checkpoint's digest); from scratch: old hashes kept
        relevant["init_from"] = init_sha or init_record(init, name)["ckpt_sha256"]
    extra = OmegaConf.select(cfg, "trainer.extra")
    if extra:   # Lightning arguments passed through (max_steps, ...) change the result; none: old hashes kept
        relevant["trainer_extra"] = OmegaConf.to_container(extra, resolve=True)
    for k in ("batch_size", "num_workers"):
        relevant["data"].pop(k, None)
    later = neutral_later_keys()
    for data in (relevant["data"], *(relevant["data"].get("members") or {}).values()):   # a mixed set's files too
        for key, value in later.items():
            # unset ("???": a mixed config's own file keys, which its members carry) reads back as neutral
            if key.startswith("data.") and isinstance(data, dict) and data.get(key[5:], value) in (value, "???"):
                data.pop(key[5:], None)
    for part, prefix in (("model", "model."), ("settings", f"stages.{name}."), ("optim", "optim.")):
        for key, value in later.items():
            if not key.startswith(prefix):
                continue
            *path, leaf = key[len(prefix):].split(".")
            node = relevant[part]
            for p in path:
                node = node.get(p) if isinstance(node, dict) else None
            if isinstance(node, dict) and leaf in node and node[leaf] == value:
                del node[leaf]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def record_config(record: Dict[str, Any], where: Path) -> DictConfig:
    """The training config a stage was trained under, from its record."""
    from ups_lightning.config import validate_train_config

    if not isinstance(record.get("config"), dict):
        raise UserError(f"{where}: the stage record carries no training config (written by an older "
                        "version); retrain the run into a new run_dir.")
    return validate_train_config(fill_later_keys(OmegaConf.create(record["config"])))


def verified_chain(run_dir: Path, last: str, fix: str) -> Dict[str, Dict[str, Any]]:
    """The records of every stage up to `last`, each verified: the record reads, its checkpoint's
    bytes match, it was trained on its upstream's current checkpoint, and its config hash is the one
    its own config gives. Any break is a UserError saying which stage and the command that fixes it."""
    records: Dict[str, Dict[str, Any]] = {}
    for name in chain(last):
        record = read_record(run_dir, name)
        if record is None:
            raise UserError(f"stage '{name}' of {run_dir} is not finished, and '{last}' builds on it. "
                            f"Train it with: {fix}")
        verify_checkpoint(run_dir, name, record, fix)
        up = UPSTREAM[name]
        upstream = records.get(up) if up else None
        if upstream is not None and record.get("upstream_sha256") != upstream["ckpt_sha256"]:
            raise UserError(
                f"stage '{name}' of {run_dir} is stale: it was trained on the '{up}' checkpoint that has "
                f"since been replaced (retrained or swept), so evaluating it would score the old '{up}'. "
                f"Retrain the stages after '{up}' with: {fix} -- or evaluate the chain up to '{up}' "
                f"with upto={up} ({command('ups_lightning.evaluate')} run_dir={run_dir} upto={up}).")
        cfg = record_config(record, stage_dir(run_dir, name) / DONE)
        if stage_config_hash(cfg, name, upstream, (record.get("init_from") or {}).get("ckpt_sha256")) \
                != record["config_hash"]:
            raise UserError(f"stage '{name}' of {run_dir}: its record's config hash does not match the "
                            f"config it carries (the record was edited). Retrain with: {fix}")
        records[name] = record
    return records


# --- modules from checkpoints ----------------------------------------------------------------------
def nonfinite_tensors(state: Dict[str, Any]) -> List[str]:
    """Names of floating-point tensors holding NaN or Inf."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def load_stage(run_dir: str | Path, name: str, record: Dict[str, Any], fix: str = "") -> Any:
    """The stage's LightningModule from its verified checkpoint, loaded as data (weights_only)."""
    path = verify_checkpoint(run_dir, name, record, fix or train_command(run_dir))
    try:
        module = get_stage(name).load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint that is not ours: refused, never executed
        raise UserError(f"stage '{name}' of {run_dir}: {path} is not a checkpoint this version can load "
                        f"as plain weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
                        "Retrain the stage.") from None
    bad = nonfinite_tensors(module.state_dict())
    if bad:
        raise UserError(f"stage '{name}' of {run_dir}: {len(bad)} tensors of {path} hold NaN/Inf "
                        f"(e.g. {bad[0]}); this model cannot be scored. Retrain the stage.")
    module.eval()
    return module


def init_record(run_dir: str | Path, name: str) -> Dict[str, Any]:
    """The finished stage ``name`` of the run ``init_from`` names, or a UserError saying what is missing."""
    record = read_record(run_dir, name) if Path(run_dir).is_dir() else None
    if record is None or not record.get("ckpt_sha256"):
        raise UserError(f"setting init_from={run_dir}: {'no such run directory' if not Path(run_dir).is_dir() else f'it has no finished {name!r} stage'}; "
                        f"init_from names a run whose stages finished (its {name} stage is what this run's "
                        f"{name} stage starts from). Train it first ({train_command(run_dir)}) or set init_from=null.")
    return record


def init_weights(module: Any, run_dir: str | Path, name: str) -> Dict[str, Any]:
    """Start ``module`` (stage ``name``, prepared: its upstream networks in) from the verified weights of
    that stage of the run ``run_dir``: every tensor of the networks it trains (and its own copies of
    them) whose name and shape match is copied, the rest
    keep their initialisation (a conditioning layer sized for other equations, a stem for other
    channels). Returns what it did, for the stage's record and the log."""
    record = init_record(run_dir, name)
    path = verify_checkpoint(run_dir, name, record, train_command(run_dir))
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]   # data, never code
    own = module.state_dict()
    # the networks it trains and its own copies of them (distill's target), not data-set buffers (r_std)
    parts = tuple({f"{p}." for p in module.trains} | {p for p in getattr(module, "own_prefixes", ()) if p.endswith(".")})
    mine = [k for k in own if k.startswith(parts)]
    copied = [k for k in mine if k in state and tuple(state[k].shape) == tuple(own[k].shape)]
    if not copied:
        raise UserError(f"setting init_from={run_dir}: none of the {len(mine)} tensors of this run's {name} stage "
                        f"matches one of that run's in name and shape (another model size?): nothing to start from.")
    module.load_state_dict({k: state[k] for k in copied}, strict=False)
    fresh = sorted(set(mine) - set(copied))
    return {"run": str(run_dir), "ckpt_sha256": record["ckpt_sha256"], "copied": len(copied), "fresh": fresh}


def check_carried_networks(run_dir: str | Path, records: Dict[str, Dict[str, Any]], module: Any, fix: str) -> None:
    """The networks the evaluated (last) stage carries from upstream are the verified upstream
    stages' own, tensor for tensor (upstream networks are frozen downstream): a last checkpoint taken
    from another run, its record re-signed, is refused instead of scored as this run's. Top-level
    buffers (normalisation statistics each stage sets from the data) are not networks and are left out."""
    own = module.state_dict()
    chain = list(records)
    for name in chain[:-1]:
        path = verify_checkpoint(run_dir, name, records[name], fix)
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        differ = [k for k, v in state.items() if "." in k and torch.is_tensor(v)
                  and (k not in own or own[k].shape != v.shape or not torch.equal(own[k], v))]
        if differ:
            raise UserError(f"stage '{chain[-1]}' of {run_dir} carries networks that are not its verified "
                            f"'{name}' stage's ({len(differ)} tensors differ, e.g. {differ[0]}): its checkpoint "
                            f"was not trained on this run's '{name}'. Retrain the stages after '{name}' with: {fix}")


def load_snapshots(run_dir: str | Path, name: str, record: Dict[str, Any]) -> Dict[int, Dict[str, torch.Tensor]]:
    """{epoch: state_dict} of the network snapshots a stage saved (``stages.<stage>.snapshot_every``),
    each file checked against the digest its record keeps and loaded as data (weights_only). A stage
    trained without snapshots gives {}."""
    from ups_lightning.stages.callbacks import SNAPSHOTS

    out: Dict[int, Dict[str, torch.Tensor]] = {}
    folder = stage_dir(run_dir, name) / SNAPSHOTS
    for fname, recorded in sorted((record.get("snapshots") or {}).items()):
        path = folder / fname
        if not path.is_file() or sha256_file(path) != recorded:
            raise UserError(f"stage '{name}' of {run_dir}: snapshot {path} is missing or does not match its "
                            "record (changed after training). Retrain the stage with its snapshot_every "
                            "setting, or use members that are not snapshots.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        bad = nonfinite_tensors(state)
        if bad:
            raise UserError(f"stage '{name}' of {run_dir}: snapshot {path} holds NaN/Inf ({bad[0]}).")
        out[int(fname[len("epoch"):-len(".pt")])] = state
    return out
