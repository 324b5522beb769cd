"""A Hydra launcher that runs every job of a multirun as a Ray task, on a local Ray instance it starts
(the default) or on a running cluster (``hydra.launcher.address=auto`` on a cluster node, or
``ray://<head>:10001``):

    python -m ups_lightning.train -m hydra/launcher=ray model=dim8,dim16 stage=all

Hydra's own Ray plugin (hydra-ray-launcher) pins Ray 1.x, which has no wheels for current Pythons;
this one uses Ray 2.x directly. Each task gets ``cpus_per_job`` CPUs and ``gpus_per_job`` GPUs, so Ray
runs as many jobs at once as the machine or cluster has room for. The job's configs are composed
here, in the driver, exactly as Hydra's basic launcher does; the task runs the job with Hydra's
``run_job`` in a Ray worker, which must see the same files (the sweep directory, the data).
"""

# no `from __future__ import annotations`: Hydra execs plugin modules outside sys.modules, where
# dataclasses cannot resolve string annotations
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.ups_ray_launcher.ray_launcher.RayLauncher"
    address: Optional[str] = None        # None: start a local Ray instance; "auto" / "ray://host:port": join one
    num_cpus: Optional[int] = None       # CPUs of a local instance (None: Ray's count of this machine's)
    cpus_per_job: float = 1.0            # Ray resources each job asks for
    gpus_per_job: float = 0.0
    object_store_mb: int = 256           # a local instance's object store (jobs pass only configs and results)


ConfigStore.instance().store(group="hydra/launcher", name="ray", node=RayLauncherConf, provider="ups_lightning")


def _run_remote(hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig,
                singleton_state: Any) -> JobReturn:
    """One job in a Ray worker: Hydra's global state from the driver, then Hydra's own run_job."""
    setup_globals()
    Singleton.set_state(singleton_state)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


class RayLauncher(Launcher):
    def __init__(self, address: Optional[str] = None, num_cpus: Optional[int] = None, cpus_per_job: float = 1.0,
                 gpus_per_job: float = 0.0, object_store_mb: int = 256) -> None:
        self.address, self.num_cpus = address, num_cpus
        self.cpus_per_job, self.gpus_per_job, self.object_store_mb = cpus_per_job, gpus_per_job, object_store_mb
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            import ray
        except ImportError:
            raise RuntimeError("hydra/launcher=ray needs Ray: pip install 'ray>=2.9' "
                               "(or pip install -e \".[sweeps]\").") from None
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        if not ray.is_initialized():
            local = self.address is None
            ray.init(address=self.address, include_dashboard=False, log_to_driver=True,
                     **({"num_cpus": self.num_cpus, "object_store_memory": self.object_store_mb << 20}
                        if local else {}))
        log.info("Launching %d jobs on Ray (%s), %g CPUs and %g GPUs each", len(job_overrides),
                 self.address or "a local instance", self.cpus_per_job, self.gpus_per_job)
        task = ray.remote(num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job)(_run_remote)
        state = Singleton.get_state()
        pending: List[Any] = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"ray_{idx}"
                sweep_config.hydra.job.num = idx
            pending.append(task.remote(self.hydra_context, self.task_function, sweep_config, state))
        results = ray.get(pending)
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return results
