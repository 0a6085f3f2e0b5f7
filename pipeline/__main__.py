"""`python -m pipeline stage=all` — the command-line edge: Hydra composes `conf/`, the runner does the rest."""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .cluster import follow_jobs_without_accounting, release_requeue_signal, sweep_point_name
from .config import ConfigError
from .runner import run

log = logging.getLogger("pipeline")
follow_jobs_without_accounting()  # here, in the process that submits and waits for the jobs of a -m run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    release_requeue_signal()  # a SLURM task starts with it blocked; submitit's handler is in place now
    hydra_cfg = HydraConfig.get()
    cfg.experiment = hydra_cfg.runtime.choices.get("experiment") or cfg.experiment
    if hydra_cfg.mode == RunMode.MULTIRUN:  # each sweep point gets its own folder, named by what varies
        cfg.sweep_point = sweep_point_name(hydra_cfg)
    try:
        run(cfg)
    except ConfigError as err:  # a user error: one line, no traceback (unless debug=true)
        if cfg.debug:
            raise
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
