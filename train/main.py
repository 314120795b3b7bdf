"""Entry point: ``python -m train.main --config configs/vig_t.py[:args] --workdir DIR``.

Config fields can be overridden on the command line, e.g. ``--config.total_epochs=10``
or ``--config.data.root=/data/imagenet``. Everything else is in :mod:`train.trainer`.
Exit status: 0 when training finished, 143 when stopped by SIGTERM/SIGINT after saving a
checkpoint (run the same command again to resume).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/vig_t.py:quick.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_PREEMPTED = 143


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    from train import trainer  # After flag parsing: Grain workers need parsed absl flags.

    summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if summary.get("preempted"):
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    app.run(main)
