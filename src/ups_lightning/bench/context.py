"""What every method of one benchmark shares: the training config our pipeline composes from the
bench's settings, and the data, splits and scoring (``Bench``)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from ups_lightning.bench.settings import STAGE_SHARES
from ups_lightning.config import compose_config, model_overrides
from ups_lightning.provenance import scored

__all__ = ["Bench", "compose_train_config"]


def _tag(value: float) -> str:
    return f"{value:g}".replace(".", "p").replace("-", "m")


def compose_train_config(cfg: Any, checked: Dict[str, Any], run_dir: Path, seed: int,
                         operator_lr: Optional[float] = None, budget_min: Optional[float] = None):
    """The training config of our pipeline for this bench: the bench's data and model, the
    experiment's stage settings, autoencoder + operator with max_minutes = their shares of the budget,
    the bench's loss choice. Peers train under the same config's trainer, optimiser and callbacks."""
    from omegaconf import OmegaConf

    budget = budget_min or checked["budget_min"]
    overrides = [f"experiment={cfg.experiment}", f"data={cfg.data.name}", *model_overrides(cfg.model.name),
                 f"run_dir={run_dir}", f"seed={seed}", "callbacks.progress_bar=none", "stage=operator",
                 f"stages.operator.relative_loss={str(checked['relative_loss']).lower()}",
                 # the peers train eager: compiling ours alone would give it more steps in the same
                 # clock than the benchmark gives them (a train_overrides entry can still turn it on)
                 "trainer.compile=false"]
    overrides += [f"stages.{k}.max_minutes={budget * checked['shares'][k]:.6g}" for k in STAGE_SHARES]
    if operator_lr is not None:
        overrides.append(f"stages.operator.lr={operator_lr:g}")
    if checked["threads"]:
        overrides.append(f"trainer.num_threads={checked['threads']}")
    overrides += list(cfg.get("train_overrides") or [])
    tcfg = compose_config("train", overrides)
    OmegaConf.set_struct(tcfg, False)
    # the bench's own data and model groups, with any dotted overrides the user gave them
    tcfg.data = OmegaConf.merge(tcfg.data, cfg.data)
    tcfg.model = OmegaConf.merge(tcfg.model, cfg.model)
    if checked["n_test"] is not None:
        tcfg.data.n_test = min(int(tcfg.data.n_test), checked["n_test"])
    tcfg.stage.run = list(STAGE_SHARES)
    return tcfg


def _fingerprint(payload: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# the context every method shares
# --------------------------------------------------------------------------------------------
class Bench:
    """The bench's data, splits, guard and settings, shared by every method's training and scoring."""

    def __init__(self, cfg: Any, checked: Dict[str, Any], say: Callable[[str], None]) -> None:
        import torch

        from ups_lightning.data.datamodule import open_run_data
        from ups_lightning.errors import UserError
        from ups_lightning.pdes import get_pde

        self.cfg, self.checked, self.say = cfg, checked, say
        self.out = Path(cfg.out_dir)
        self.base_cfg = compose_train_config(cfg, checked, self.out / "runs" / "_", seed=checked["seeds"][0])
        self.data_cfg = self.base_cfg.data
        data = open_run_data(self.data_cfg)
        if len(data.views) != 1:
            raise UserError(f"bench: data={self.data_cfg.name} holds {len(data.views)} equations; the "
                            "benchmark runs on one file of one equation (pass data=<equation>).")
        self.view = data.views[0]
        self.params = data.params[self.view.pde]
        self.spec = get_pde(self.view.pde)
        self.meta = self.view.meta
        self.n_given = int(self.data_cfg.initial_step)
        self.trainer: Any = None     # the Models that trained this bench's models (run_methods)
        self.split = {s: torch.from_numpy(self.view.read(s)).float() for s in ("train", "val", "test")}
        self._persistence_nrmse: Dict[str, float] = {}
        if self.split["test"].shape[1] <= self.n_given:
            raise UserError(f"{self.view.path}: {self.split['test'].shape[1]} frames after reduction, but "
                            f"initial_step={self.n_given} frames are given: nothing is left to predict.")

    def persistence(self, split: str = "test") -> Any:
        """Persistence's prediction on ``split``: the last given frame held over every predicted frame."""
        fields = self.split[split]
        return fields[:, self.n_given - 1:self.n_given].expand_as(fields[:, self.n_given:]).clone()

    def persistence_nrmse(self, split: str = "val") -> float:
        """Persistence's nRMSE on ``split``: the trivial reference every method's ``learned`` is judged
        against (the peers' ``val/nrmse_persistence``). Scored once per split and kept."""
        if split not in self._persistence_nrmse:
            self._persistence_nrmse[split] = float(self.score(self.persistence(split), split)["nrmse"])
        return self._persistence_nrmse[split]

    def score(self, pred: Any, split: str = "test") -> Dict[str, Any]:
        import torch

        from ups_lightning.eval.metrics import all_metrics, nrmse_pdebench

        fields = self.split[split]
        u0, truth = fields[:, self.n_given - 1], fields[:, self.n_given:]
        m = all_metrics(pred, truth, dx=self.meta.dx, domain_length=self.meta.domain_length, u0=u0)
        m["nrmse_pdebench"] = nrmse_pdebench(torch.cat([fields[:, :self.n_given], pred], 1), fields, self.n_given)
        scored(split)   # provenance.json counts every scoring
        return m
