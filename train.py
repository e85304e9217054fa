"""divmerge command line: ``python train.py {fit,validate,test,export} [--config CONFIG] [--flags]``.

Without ``--config`` the built-in offline demo (configs/demo4.yaml) runs: it builds four MiniLM experts
on first use, learns layer-wise JS merge coefficients and prints the per-task accuracy table.
"""

import divmerge.zoo  # noqa: F401  (the offline demo: registers the zoo: scheme)
from divmerge.lightning.cli import DEMO_CONFIG, DivMergeCLI, main, make_cli, with_default_config

__all__ = ["DEMO_CONFIG", "DivMergeCLI", "main", "make_cli", "with_default_config"]

if __name__ == "__main__":
    main()
