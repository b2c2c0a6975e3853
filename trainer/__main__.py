"""``python -m trainer --config file.yaml [--set key=value ...]``: train one config, print final metrics."""

from __future__ import annotations

import argparse
import json
import sys

from trainer.config import ConfigError, load
from trainer.fit import fit
from trainer.heads import UnknownExitError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("--config", help="trainer YAML (defaults: ResNet-20 on scikit-learn digits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set optim.epochs=5 (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        result = fit(cfg, progress=True)
    except (ConfigError, UnknownExitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    final = {**result.history[-1].metrics, **result.test, "best_val_acc": result.best_val_acc}
    if result.model_path:
        final["model"] = str(result.model_path)
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
