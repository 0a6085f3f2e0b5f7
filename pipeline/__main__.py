"""`python -m pipeline stage=all` — the command-line edge: Hydra composes `conf/`, the runner does the rest."""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import ConfigError
from .runner import run

log = logging.getLogger("pipeline")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    cfg.experiment = HydraConfig.get().runtime.choices.get("experiment") or cfg.experiment
    try:
        run(cfg)
    except ConfigError as err:  # a user error: one line, no traceback (unless debug=true)
        if cfg.debug:
            raise
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
