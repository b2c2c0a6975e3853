"""``snn-train --config file.yaml [--set key=value ...]`` (or ``python -m trainer``): train one config and
print its final metrics as JSON. ``--list-exits`` prints the modules of the config's model that a shortcut
head can sit on, with what each gives on a dry run, and trains nothing."""

from __future__ import annotations

import json
import signal
import sys

from trainer import stop
from trainer.errors import Parser, command


def make_parser(prog: str = "snn-train") -> Parser:
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument("--config", help="trainer YAML (defaults: ResNet-20 on scikit-learn digits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set optim.epochs=5 (repeatable)")
    parser.add_argument("--list-exits", action="store_true",
                        help="list the modules a head can sit on (names for heads.exits), then exit")
    return parser


def list_exits(cfg) -> str:
    """One line per module whose output a head reads: name, layout, shape per timestep and sample."""
    from trainer.probe import default_exits, probe

    defaults = default_exits(cfg.model.arch)
    rows = [(name, tap.layout, "x".join(map(str, tap.shape[2:] if tap.layout != "flat" else tap.shape[1:])),
             "default" if name in defaults else "")
            for name, tap in probe(cfg).taps.items() if tap.layout and tap.calls == 1]
    width = max(len(r[0]) for r in rows)
    head = (f"# {cfg.model.arch} on {cfg.data.name}: {len(rows)} modules a head can read "
            f"(shapes per timestep and sample; default: heads.exits=[default])")
    return "\n".join([head, *(f"{n:<{width}}  {layout:<6}  {shape:<14} {d}".rstrip() for n, layout, shape, d in rows)])


@command
def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from trainer.config import load
    from trainer.fit import fit
    from trainer.probe import check

    cfg = load(args.config, args.overrides)
    if args.list_exits:
        print(list_exits(cfg))
        return 0
    check(cfg)  # the model and its heads, on a dry run, before any data is read
    with stop.handling():
        try:
            result = fit(cfg, progress=True)
        except KeyboardInterrupt:  # Stopped after a batch, or a second Ctrl-C mid-batch
            signum = stop.requested() or signal.SIGINT
            again = " with --set run.resume=true" if cfg.run.out_dir else ""
            print(f"{stop.WHY[signum]}: the last finished epoch is kept; run the same command again{again} to go "
                  f"on", file=sys.stderr, flush=True)
            return 128 + signum
    final = {**result.history[-1].metrics, **result.test, "best_val_acc": result.best_val_acc}
    if result.model_path:
        final["model"] = str(result.model_path)
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
