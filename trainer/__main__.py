"""``snn-train --config file.yaml [--set key=value ...]`` (or ``python -m trainer``): train one config and
print its final metrics as JSON."""

from __future__ import annotations

import json
import sys

from trainer.errors import Parser, command


def make_parser(prog: str = "snn-train") -> Parser:
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument("--config", help="trainer YAML (defaults: ResNet-20 on scikit-learn digits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set optim.epochs=5 (repeatable)")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from trainer.config import load
    from trainer.fit import fit

    result = fit(load(args.config, args.overrides), progress=True)
    final = {**result.history[-1].metrics, **result.test, "best_val_acc": result.best_val_acc}
    if result.model_path:
        final["model"] = str(result.model_path)
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
