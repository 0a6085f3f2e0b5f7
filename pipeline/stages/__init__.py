"""One module per stage, each with `run(cfg, work, inputs)`; a stage that needs something a machine may lack also
has `missing(cfg, inputs)`, which says what (the runner then skips it and the run goes on)."""


class StageUnavailable(Exception):
    """The stage cannot run on this machine; the rest of the run goes on."""
