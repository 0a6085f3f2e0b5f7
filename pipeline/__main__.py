"""`python -m pipeline stage=all` — the command-line edge: Hydra composes `conf/`, the runner does the rest."""
import hashlib
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import ConfigError
from .runner import run

log = logging.getLogger("pipeline")


def sweep_point_name(overrides: str) -> str:
    """A folder name: the overrides as written (gptq.bits=3,train.lr=0.001), shortened with a hash if long."""
    name = overrides.replace("/", "_")  # empty when only excluded keys vary: the experiment folder itself
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    cfg.experiment = hydra_cfg.runtime.choices.get("experiment") or cfg.experiment
    if hydra_cfg.mode == RunMode.MULTIRUN:  # each sweep point gets its own folder, named by its overrides
        cfg.sweep_point = sweep_point_name(hydra_cfg.job.override_dirname)
    try:
        run(cfg)
    except ConfigError as err:  # a user error: one line, no traceback (unless debug=true)
        if cfg.debug:
            raise
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
