"""Structured config schema for `python -m ups_lightning.train` (and evaluate).

The schema holds types and allowed keys, never defaults: every value comes from the YAML files under
`conf/` (the one source of defaults; tests/test_configs.py composes and validates every option of
every group). The composed config is merged onto this schema before anything runs, so an unknown
key, a wrongly typed or a missing value is a clear error naming the key (`validate_train_config`)
instead of a traceback deep inside a stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ups_lightning.errors import UserError
from ups_lightning.eval.leaderboard import GateConfig

from ups_lightning.stages import STAGE_ORDER, get_stage
from ups_lightning.schema import check_ranges, check_settings, schema_error, settings_rules


@dataclass
class DataConfig:
    """One file of one equation (``pde`` a registered equation, ``params`` its parameters), or a
    mixed set (``pde: mixed``) whose ``members`` are such configs, one per equation."""

    name: str = MISSING
    pde: str = MISSING
    root: str = MISSING
    path: Optional[str] = MISSING
    params: Dict[str, float] = MISSING
    members: Optional[Dict[str, Any]] = None
    nx: int = MISSING
    ny: Optional[int] = MISSING  # cells along y of a 2D set (null: a 1D set)
    n_tokens: int = MISSING  # the latent tokens the data's grid takes (model.n_tokens follows it; 2D: a square)
    stem_layers: int = 2  # conv layers of the encoder's stem at this grid (model.stem_layers follows it; 2D sets: 1)
    nt: int = MISSING
    t_max: float = MISSING
    seed: int = MISSING
    n_train: int = MISSING
    n_val: int = MISSING
    n_test: int = MISSING
    split_layout: str = MISSING  # tail | pdebench: the rows of a file without a manifest (pdebench.open_dataset)
    pdebench_test_ratio: float = MISSING  # split_layout=pdebench: test = the first int(N * ratio) rows, in (0, 1)
    reduced_resolution: int = MISSING
    reduced_resolution_t: int = MISSING
    initial_step: int = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    dim: int = MISSING
    n_tokens: int = MISSING
    depth: int = MISSING  # operator blocks
    levels: int = MISSING  # U-shaped token down/up-sampling levels in the operator
    ae_depth: int = MISSING  # encoder blocks
    decoder_depth: int = MISSING  # decoder cross-attention blocks
    n_fourier: int = MISSING  # Fourier features of query coordinates
    diffusion_depth: int = MISSING
    attn_backend: str = MISSING  # sdpa | flash
    hidden: Optional[int] = MISSING  # MLP width (None: the rule, 2 * dim; models/sizes.py)
    heads: Optional[int] = MISSING  # attention heads, dividing dim (None: the rule from dim)
    stem_layers: int = MISSING  # the encoder's conv stem: layers at the native grid
    stem_kernel: int = MISSING  # ... their (odd) kernel size, per axis
    stem_channels: Optional[int] = MISSING  # ... their width (None: min(hidden, 64))


@dataclass
class StageSelect:
    name: str = MISSING
    run: List[str] = MISSING


@dataclass
class TrainerConfig:
    accelerator: str = MISSING
    devices: Any = MISSING
    num_nodes: int = MISSING
    strategy: str = MISSING
    precision: str = MISSING
    compile: Any = MISSING  # true | false | [stage names]: torch.compile those stages' trainable networks
    deterministic: bool = MISSING
    log_every_n_steps: int = MISSING
    limit_train_batches: Any = MISSING
    limit_val_batches: Any = MISSING
    check_val_every_n_epoch: int = MISSING
    val_every_n_steps: Optional[int] = MISSING  # validate every N training batches (None: at epoch ends)
    num_threads: Optional[int] = MISSING  # torch intra-op threads on CPU (None: torch's default)
    extra: Dict[str, Any] = MISSING  # any other lightning.Trainer argument (`+trainer.max_steps=100`), passed through


@dataclass
class EMAConfig:
    enabled: bool = MISSING
    decay: float = MISSING
    bias_correction: bool = MISSING  # True: Adam's bias-corrected average (stages/callbacks.EMA); conf/optim sets it


@dataclass
class OptimConfig:
    name: str = MISSING
    betas: List[float] = MISSING
    weight_decay: float = MISSING
    schedule: str = MISSING  # cosine | constant
    warmup_ratio: float = MISSING
    min_lr_ratio: float = MISSING
    grad_clip: Optional[float] = MISSING
    accumulate: int = MISSING
    ema: EMAConfig = field(default_factory=EMAConfig)


@dataclass
class LoggerConfig:
    name: str = MISSING  # the option's name (conf/logger/<name>.yaml)
    project: str = MISSING
    offline: bool = MISSING
    target: Dict[str, Any] = MISSING   # a Lightning logger: _target_ and its arguments (save_dir: the stage's)


@dataclass
class CheckpointConfig:
    save_top_k: int = MISSING
    save_last: bool = MISSING


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    progress_bar: str = MISSING  # rich | tqdm | none
    # further Lightning callbacks, each built from its _target_ (null switches one off)
    early_stopping: Optional[Dict[str, Any]] = MISSING
    lr_monitor: Optional[Dict[str, Any]] = MISSING


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage: StageSelect = field(default_factory=StageSelect)
    stages: Any = MISSING  # each registered stage's Settings (stages_schema: built when a config is checked)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    seed: int = MISSING
    run_name: str = MISSING
    run_dir: str = MISSING
    reuse_runs: List[str] = MISSING  # runs (globs allowed) whose finished stages of the same config are used by reference
    init_from: Optional[str] = MISSING  # a finished run whose stage weights each stage starts from (fine-tuning)
    ckpt_path: Optional[str] = MISSING
    experiment: Optional[str] = MISSING


def stages_schema(names: Sequence[str]) -> type:
    """The schema of ``stages``: one field per stage in ``names``, its ``Settings`` (imports the
    stages' modules, so it is built when a config is checked, not when this module is imported)."""
    from dataclasses import make_dataclass

    return make_dataclass("StagesConfig", [(n, get_stage(n).Settings, field(default_factory=get_stage(n).Settings))
                                           for n in names])


def train_schema(cfg: DictConfig) -> DictConfig:
    """The training schema for ``cfg``: the settings of each registered stage that ``cfg.stages``
    holds (a run trained before a stage was added has no block for it; stage.run may not name it)."""
    given = cfg.get("stages") if isinstance(cfg, DictConfig) else None
    schema = OmegaConf.structured(TrainConfig)
    schema.stages = OmegaConf.structured(stages_schema([n for n in STAGE_ORDER if given is None or n in given]))
    return schema


# Keys added after runs were trained without them, each with the value that means "as before": an
# older record is read with them filled in, and a key at that value leaves a stage's config hash
# unchanged (artifacts.stage_config_hash), so runs finished before the key existed stay valid. A
# stage's own later keys say so in its Settings (stages.settings.setting(later=...)).
NEUTRAL_LATER_KEYS: Dict[str, Any] = {
    "model.hidden": None, "model.heads": None, "reuse_runs": [], "trainer.val_every_n_steps": None,
    "optim.ema.bias_correction": False, "trainer.extra": {},
    "data.ny": None, "data.n_tokens": 32,    # every run before 2D sets: 1D, 32 tokens
    "init_from": None,
    "model.stem_layers": 2, "model.stem_kernel": 5, "model.stem_channels": None,   # the stem before they were keys
    "data.stem_layers": 2,
}


def neutral_later_keys() -> Dict[str, Any]:
    """NEUTRAL_LATER_KEYS and the registered stages' later keys (``stages.<name>.<key>``)."""
    out = dict(NEUTRAL_LATER_KEYS)
    for name in STAGE_ORDER:
        out.update({k: m["later"] for k, m in settings_rules(get_stage(name).Settings, f"stages.{name}")
                    if "later" in m})
    return out


def fill_later_keys(cfg: DictConfig) -> DictConfig:
    """An older run's config with the later keys at their neutral values (neutral_later_keys)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in neutral_later_keys().items():
            parent, _, leaf = key.rpartition(".")
            nodes = [OmegaConf.select(cfg, parent) if parent else cfg]
            if parent == "data":     # a mixed run's member files too
                nodes += list((OmegaConf.select(cfg, "data.members") or {}).values())
            for node in nodes:
                if isinstance(node, DictConfig) and leaf not in node:
                    node[leaf] = value
    return cfg


def stage_optim(cfg: DictConfig, name: str) -> Dict[str, Any]:
    """The optimiser settings stage `name` trains with: the global `optim` with the stage's own
    non-null `stages.<name>.optim` values on top (ema_decay sets optim.ema.decay)."""
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    own = OmegaConf.select(cfg, f"stages.{name}.optim")
    for key, value in (OmegaConf.to_container(own, resolve=True) if own is not None else {}).items():
        if value is None:
            continue
        if key == "ema_decay":
            optim["ema"]["decay"] = value
        else:
            optim[key] = value
    return optim


def model_overrides(name: str) -> List[str]:
    """The overrides that select the model named ``name``: its alias under conf/model (dim8 ...
    dim512), or the one model config at that size for a dimN with no alias (model=default
    model.dim=40), so a run of any size can be named again in commands."""
    from ups_lightning import CONF_DIR

    if (CONF_DIR / "model" / f"{name}.yaml").is_file() or not (name.startswith("dim") and name[3:].isdigit()):
        return [f"model={name}"]
    return ["model=default", f"model.dim={int(name[3:])}"]


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config of this project's conf/ (`train`, `evaluate`, ...) with overrides, inside a
    running Hydra application or not: what the libraries use to run one another."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ups_lightning import CONF_DIR

    if GlobalHydra.instance().is_initialized():
        return compose(name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


#: lightning.Trainer arguments the project sets itself (from the setting named): not passed through
TRAINER_MANAGED = {
    "default_root_dir": "run_dir", "max_epochs": "stages.<stage>.max_epochs", "max_time": "stages.<stage>.max_minutes",
    "gradient_clip_val": "optim.grad_clip", "accumulate_grad_batches": "optim.accumulate",
    "val_check_interval": "trainer.val_every_n_steps", "callbacks": "callbacks.*", "logger": "logger=",
    "enable_progress_bar": "callbacks.progress_bar", "enable_model_summary": "(always off)",
}


def route_trainer_extras(cfg: DictConfig) -> DictConfig:
    """``+trainer.<arg>=...`` for a lightning.Trainer argument the schema does not list moves into
    ``trainer.extra`` (passed through to the Trainer, checked by building one before any work:
    training.check_trainer_settings); an argument the project sets itself, or one Lightning does not
    have, is a UserError naming it."""
    import inspect

    known = set(TrainerConfig.__dataclass_fields__)
    given = [k for k in (cfg.get("trainer") or {}) if k not in known]
    if not given:
        return cfg
    from lightning import Trainer

    params = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    cfg = cfg.copy()
    with open_dict(cfg):
        if cfg.trainer.get("extra") is None:
            cfg.trainer.extra = {}
        for k in given:
            if k in TRAINER_MANAGED:
                raise UserError(f"trainer.{k} is set by the project from {TRAINER_MANAGED[k]}: set that instead.")
            if k not in params:
                raise UserError(f"trainer.{k} is neither a setting of conf/trainer nor an argument of "
                                f"lightning.Trainer (see its documentation for the arguments it takes).")
            cfg.trainer.extra[k] = cfg.trainer[k]
            del cfg.trainer[k]
    return cfg


def validate_train_config(cfg: DictConfig) -> DictConfig:
    """Merge the composed config onto the schema; unknown keys and wrong types become UserError."""
    cfg = route_trainer_extras(cfg)
    schema = train_schema(cfg)
    try:
        merged = OmegaConf.merge(schema, cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", "") or "")
        stage = key.split(".")[1] if key.startswith("stages.") and key.count(".") >= 1 else None
        where = (f"the Settings of ups_lightning/stages/ for stage {stage} (the schema of stages.{stage}) or "
                 "conf/stages/default.yaml") if stage in STAGE_ORDER else \
            "ups_lightning/config.py (the config schema) or the YAML files under ups_lightning/conf/"
        raise schema_error(exc, "training", where) from None
    if not str(merged.run_dir).strip():     # Path('') is the current directory: stages would land there
        raise UserError("run_dir='' names no directory: give the training run's output directory (by default "
                        "outputs/runs/<data>/<model>).")
    unknown = [s for s in merged.stage.run if s not in STAGE_ORDER]
    if unknown:
        raise UserError(
            f"stage.run lists unknown stage(s) {unknown}; known stages are {list(STAGE_ORDER)} "
            f"(pick a stage with stage={'|'.join(STAGE_ORDER)}|all)."
        )
    unset = [s for s in merged.stage.run if s not in merged.stages]
    if unset:
        raise UserError(f"stage.run lists {unset} but the config holds no stages.{unset[0]} settings: add its "
                        "block to conf/stages/default.yaml (or +stages.<name>={...} on the command line).")
    if merged.model.attn_backend not in ("sdpa", "flash"):
        raise UserError(f"model.attn_backend={merged.model.attn_backend!r}: expected 'sdpa' or 'flash'.")
    if merged.model.stem_kernel % 2 == 0:
        raise UserError(f"model.stem_kernel={merged.model.stem_kernel}: expected an odd kernel size (3, 5, ...), "
                        "so that the stem keeps the grid's shape.")
    if merged.optim.schedule not in ("cosine", "constant"):
        raise UserError(f"optim.schedule={merged.optim.schedule!r}: expected 'cosine' or 'constant'.")
    for key in ("logger.target", "callbacks.early_stopping", "callbacks.lr_monitor"):
        built = OmegaConf.select(merged, key)
        if built is not None and not str(built.get("_target_") or "").strip():
            raise UserError(f"{key} has no _target_: it must name the Lightning class to build (e.g. "
                            "lightning.pytorch.callbacks.EarlyStopping), or be null to switch it off.")
    for key in ("optim.ema.enabled", "optim.ema.bias_correction"):   # the schema would read 2 as true
        raw = OmegaConf.select(cfg, key)
        if raw is not None and not isinstance(raw, bool):
            raise UserError(f"{key}={raw!r}: expected true or false.")
    if merged.optim.name != "adamw":     # the one optimiser the stages build (stages.base.ScheduledAdamW)
        raise UserError(f"optim.name={merged.optim.name!r}: expected 'adamw', the optimiser every stage trains "
                        "with (conf/optim/adamw.yaml); no other is implemented.")
    if merged.callbacks.progress_bar not in ("rich", "tqdm", "none"):
        raise UserError(f"callbacks.progress_bar={merged.callbacks.progress_bar!r}: expected rich, tqdm or none.")
    compiled = merged.trainer.compile
    if not (isinstance(compiled, bool) or (OmegaConf.is_list(compiled)
                                          and all(c in STAGE_ORDER for c in compiled))):
        raise UserError(f"trainer.compile={compiled!r}: expected true (every stage), false (none) or a list "
                        f"of stage names from {list(STAGE_ORDER)}, e.g. trainer.compile=[{STAGE_ORDER[-1]}].")
    _check_complete(merged, "training")
    check_ranges(merged, TRAIN_RANGES)
    for name in STAGE_ORDER:
        check_settings(merged, get_stage(name).Settings, f"stages.{name}")
    for key in ["optim.betas", *(f"stages.{s}.optim.betas" for s in STAGE_ORDER)]:
        check_betas(merged, key)
    if merged.model.heads is not None and merged.model.dim % merged.model.heads:
        raise UserError(f"model.heads={merged.model.heads} must divide model.dim={merged.model.dim} (each head "
                        "gets dim / heads features); pick a divisor, or null for the rule from dim.")
    _check_data(merged.data)
    return merged


def _check_complete(cfg: DictConfig, what: str) -> None:
    """Every value set: the schema has no defaults, so a key no YAML file sets is named here. A mixed
    data config's own file keys are unused (its members carry them)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if OmegaConf.select(cfg, "data.pde") == "mixed":
        missing = [k for k in missing if not k.startswith("data.") or k.startswith("data.members")]
    if missing:
        raise UserError(f"the {what} config leaves {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''} unset; set {'it' if len(missing) == 1 else 'them'} "
                        "on the command line (key=value) or in the YAML files under conf/.")


def _check_data(data: DictConfig) -> None:
    """A single-file data config names a registered equation; a mixed one (pde: mixed) lists
    members, each a valid single-file data config."""
    from ups_lightning.pdes import get_pde

    if data.pde != "mixed":
        if data.members:
            raise UserError(f"data.members is set but data.pde={data.pde!r}: a mixed data config has "
                            "pde: mixed.")
        get_pde(data.pde)
        from ups_lightning.data.pdebench import check_split_layout

        unset = [k for k in ("split_layout", "pdebench_test_ratio") if OmegaConf.is_missing(data, k)]
        if unset:   # a member of a mixed config (the top level is checked by _check_complete)
            raise UserError(f"data={OmegaConf.select(data, 'name')} leaves {', '.join(unset)} unset; set "
                            "it in its YAML under conf/data/ or on the command line (key=value).")
        check_split_layout(data.split_layout, data.pdebench_test_ratio)
        if not data.path:
            raise UserError(f"data.path is not set for data={data.name}: name the PDEBench-layout file.")
        return
    if not data.members:
        raise UserError(f"data={data.name} is mixed (pde: mixed) but lists no members; list one data "
                        "config per equation under data.members.")
    schema = OmegaConf.structured(DataConfig)
    for key in list(data.members):
        try:
            member = OmegaConf.merge(schema, data.members[key])
        except OmegaConfBaseException as exc:
            raise schema_error(exc, f"data.members.{key}", "conf/data/") from None
        if member.pde == "mixed" or member.members:
            raise UserError(f"data.members.{key}: a member is one file of one equation, not a mixed set.")
        check_ranges(OmegaConf.create({"data": member}), [r for r in TRAIN_RANGES if r[0].startswith("data.")])
        _check_data(member)
        data.members[key] = member


# (key, lower bound, lower bound included, upper bound or None): numbers a run cannot work with
TRAIN_RANGES = [
    *[(f"data.{k}", 1, True, None) for k in ("n_train", "n_val", "n_test", "initial_step", "batch_size",
                                             "reduced_resolution", "reduced_resolution_t", "nx", "ny", "n_tokens",
                                             "stem_layers")],
    ("data.nt", 2, True, None), ("data.t_max", 0.0, False, None),
    ("data.num_workers", 0, True, None),
    *[(f"model.{k}", 1, True, None) for k in ("dim", "n_tokens", "depth", "levels", "ae_depth",
                                              "decoder_depth", "n_fourier", "diffusion_depth")],
    ("optim.weight_decay", 0.0, True, None), ("optim.warmup_ratio", 0.0, True, 1.0),
    ("optim.min_lr_ratio", 0.0, True, 1.0), ("optim.grad_clip", 0.0, False, None),
    ("optim.accumulate", 1, True, None), ("optim.ema.decay", 0.0, True, 1.0),
    ("model.hidden", 1, True, None), ("model.heads", 1, True, None),
    ("model.stem_layers", 1, True, None), ("model.stem_kernel", 1, True, None), ("model.stem_channels", 1, True, None),
    ("seed", 0, True, 2 ** 32 - 1),      # what Lightning's seed_everything accepts
    ("trainer.num_nodes", 1, True, None), ("trainer.log_every_n_steps", 1, True, None),
    ("trainer.check_val_every_n_epoch", 1, True, None), ("trainer.val_every_n_steps", 1, True, None), ("trainer.num_threads", 1, True, None),
    ("callbacks.checkpoint.save_top_k", 1, True, None), ("callbacks.early_stopping.patience", 1, True, None),
    ("callbacks.early_stopping.min_delta", 0.0, True, None),
]


def check_betas(cfg: DictConfig, key: str) -> None:
    betas = OmegaConf.select(cfg, key)
    if betas is not None and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
        raise UserError(f"setting {key}={list(betas)}: expected two numbers in [0, 1).")


def to_container(cfg: Any) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# --- `python -m ups_lightning.evaluate` ------------------------------------------------------------
@dataclass
class EvalDataConfig:
    path: Optional[str] = MISSING  # another PDEBench-layout file (default: the run's own file)


@dataclass
class GuardConfig:
    reencode: bool = MISSING  # decode and re-encode every rolled-out state
    invariants: bool = MISSING  # project decoded states onto the equation's invariants (its spec)


@dataclass
class TTCCandidates:
    members: List[str] = MISSING  # more run directories (other seeds): an operator ensemble
    perturb: float = MISSING  # latent noise scale of the extra draws
    corrector: Optional[str] = MISSING  # student | teacher: the extra draws are corrector samples
    corrector_scale: float = MISSING
    mean: bool = MISSING  # the last candidate is the members' mean step
    snapshots: int = MISSING  # the run's own latest operator snapshots as more members (one training run)


@dataclass
class TTCReward:
    name: str = MISSING  # physics | consistency | verifier (inference/rewards.py)
    cells: Optional[int] = MISSING  # consistency: the solver's grid
    verifier: Optional[str] = MISSING  # verifier: its weights file (verifier.pt)
    weights: Dict[str, float] = MISSING  # physics: penalty weights; unnamed ones weigh 1


@dataclass
class TTCSettings:
    enabled: bool = MISSING
    n_candidates: int = MISSING
    beam_width: int = MISSING
    horizon: int = MISSING
    budget: Optional[int] = MISSING
    candidates: TTCCandidates = field(default_factory=TTCCandidates)  # conf/ttc/*.yaml
    reward: TTCReward = field(default_factory=TTCReward)


@dataclass
class BaselinesConfig:
    enabled: bool = MISSING  # beside a TTC row: the rivals without search (inference/baselines.py)
    hybrid_weights: List[float] = MISSING  # the solver hybrid's blend weights, one chosen on validation
    hybrid_weight: Optional[float] = MISSING  # a fixed blend weight instead (no validation pass)


@dataclass
class EvaluateConfig:
    run_dir: str = MISSING
    upto: Optional[str] = MISSING  # evaluate the chain up to this stage (None: the last finished)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    split: Optional[str] = MISSING  # train | val | test | all (None: test, or all for a foreign file)
    corrector: str = MISSING
    corrector_rows: Any = MISSING  # auto (only when the corrector's stage learned) | true | false
    correct_every: int = MISSING
    ensemble_members: int = MISSING
    guard: GuardConfig = field(default_factory=GuardConfig)
    ttc: TTCSettings = field(default_factory=TTCSettings)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    batch_size: int = MISSING
    n_show: int = MISSING
    progress_bar: str = MISSING   # auto (on a terminal) | tqdm | none: evaluation's modes and the TTC search
    seed: int = MISSING
    num_threads: Optional[int] = MISSING
    note: str = MISSING
    leaderboard: str = MISSING
    html: str = MISSING
    gates: GateConfig = field(default_factory=GateConfig)   # the leaderboard's own gates


EVAL_RANGES = [
    ("correct_every", 1, True, None), ("ensemble_members", 1, True, None), ("batch_size", 1, True, None),
    ("n_show", 0, True, None), ("num_threads", 1, True, None),
    ("ttc.n_candidates", 1, True, None), ("ttc.beam_width", 1, True, None), ("ttc.horizon", 1, True, None),
    ("ttc.budget", 1, True, None), ("ttc.candidates.perturb", 0.0, True, None),
    ("ttc.candidates.corrector_scale", 0.0, True, None), ("ttc.candidates.snapshots", 0, True, None), ("ttc.reward.cells", 3, True, None),
    *[(f"gates.{k}", 0.0, True, None) for k in ("delta", "max_mass_ratio", "max_boundary_ratio",
                                                "max_calibration_ratio", "max_wallclock_ratio")],
]
EVAL_SPLITS = ("train", "val", "test", "all")


def validate_eval_config(cfg: DictConfig) -> DictConfig:
    """The evaluation config merged onto its schema: unknown keys, wrong types (`guard.reencode=abc`)
    and out-of-range values are UserErrors naming the key, before anything is read or written."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvaluateConfig), cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        raise schema_error(exc, "evaluation", "ups_lightning/config.py (EvaluateConfig) or "
                                              "ups_lightning/conf/evaluate.yaml") from None
    if OmegaConf.is_missing(merged, "run_dir") or not str(merged.run_dir).strip():
        raise UserError("evaluate needs run_dir=DIR: the output directory of a training run "
                        "(by default outputs/runs/<data>/<model>).")
    _check_complete(merged, "evaluation")
    if merged.upto is not None and merged.upto not in STAGE_ORDER[1:]:
        raise UserError(f"upto={merged.upto!r}: expected one of {list(STAGE_ORDER[1:])} (the chain up to "
                        "that stage is evaluated) or null for the last finished stage.")
    if merged.split is not None and merged.split not in EVAL_SPLITS:
        raise UserError(f"split={merged.split!r}: expected one of {list(EVAL_SPLITS)} (all: every row of the file).")
    if merged.corrector not in ("student", "teacher"):
        raise UserError(f"corrector={merged.corrector!r}: expected student or teacher.")
    from ups_lightning.progress import PROGRESS_BARS

    if merged.progress_bar not in PROGRESS_BARS:
        raise UserError(f"progress_bar={merged.progress_bar!r}: expected auto (a bar on a terminal), tqdm (always) "
                        "or none.")
    if merged.corrector_rows not in ("auto", True, False):
        raise UserError(f"corrector_rows={merged.corrector_rows!r}: expected auto (score the corrected and "
                        "ensemble rows only when the corrector's stage learned), true or false.")
    from ups_lightning.pdes.base import PENALTY_DOCS

    from ups_lightning.inference.rewards import REWARDS

    unknown = sorted(set(merged.ttc.reward.weights) - set(PENALTY_DOCS))
    if unknown:
        raise UserError(f"ttc.reward.weights has unknown penalty(ies) {unknown}: expected some of "
                        f"{', '.join(PENALTY_DOCS)} (each equation uses the ones that hold for it).")
    for k, w in merged.ttc.reward.weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise UserError(f"ttc.reward.weights.{k}={w}: expected a finite number >= 0.")
    if merged.ttc.reward.name not in REWARDS:
        raise UserError(f"ttc.reward.name={merged.ttc.reward.name!r}: expected one of {', '.join(REWARDS)} "
                        "(inference/rewards.py).")
    if merged.ttc.candidates.corrector not in (None, "student", "teacher"):
        raise UserError(f"ttc.candidates.corrector={merged.ttc.candidates.corrector!r}: expected null, student "
                        "or teacher.")
    check_ranges(merged, EVAL_RANGES)
    weights = list(merged.baselines.hybrid_weights) + (
        [] if merged.baselines.hybrid_weight is None else [merged.baselines.hybrid_weight])
    if not weights or not all(math.isfinite(w) and 0.0 <= w <= 1.0 for w in weights):
        raise UserError(f"baselines.hybrid_weights={list(merged.baselines.hybrid_weights)}, baselines.hybrid_weight="
                        f"{merged.baselines.hybrid_weight}: the solver hybrid's blend weights must lie in [0, 1] "
                        "(1: the coarse solve replaces each new frame's cell averages; 0: the plain rollout), "
                        "and at least one must be given.")
    return merged
