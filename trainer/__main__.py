"""``snn-train --config file.yaml [--set key=value ...]`` (or ``python -m trainer``): train one config and
print its final metrics as JSON. ``--list-exits`` prints the modules of the config's model that a shortcut
head can sit on, with what each gives on a dry run, and trains nothing."""

from __future__ import annotations

import json
import signal
import sys

from trainer import stop
from trainer.errors import Parser, UserError, command


def make_parser(prog: str = "snn-train") -> Parser:
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument("--config", help="trainer YAML (defaults: ResNet-20 on scikit-learn digits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set optim.epochs=5 (repeatable)")
    parser.add_argument("--list-exits", action="store_true",
                        help="list the modules a head can sit on (names for heads.exits), then exit")
    parser.add_argument("--gradients", action="store_true",
                        help="one batch at initialisation: the gradient at each spiking layer relative to the last, "
                        "without and with the heads, each neuron's E[sg^2] and a verdict (explodes, balanced, "
                        "vanishes), then exit")
    return parser


def list_exits(cfg) -> str:
    """One line per module whose output a head reads: name, layout, shape per timestep and sample, and the
    gradient reaching it at initialisation (relative to the last spiking layer's, without heads; needs one
    batch of the data set); then the verdict of ``--gradients`` and the exits where heads would help most."""
    from trainer.gradients import profile
    from trainer.probe import default_exits, probe

    defaults = default_exits(cfg.model.arch)
    taps = {name: tap for name, tap in probe(cfg).taps.items() if tap.layout and tap.calls == 1}
    try:
        flow = profile(cfg.model_copy(update={"heads": cfg.heads.model_copy(update={"exits": []})}),
                       defaults or list(taps))
        tail = [f"verdict: {flow.verdict()}", flow.advice()]
    except UserError as err:  # the listing needs no data; the gradient a batch, and spiking layers it knows
        flow, tail = None, [f"(no |dL/dx|: {err})"]
    rows = [(name, tap.layout, "x".join(map(str, tap.shape[2:] if tap.layout != "flat" else tap.shape[1:])),
             "" if flow is None or (g := flow.at(name)) is None else f"{g:.3g}", "default" if name in defaults else "")
            for name, tap in taps.items()]
    width = max(len(r[0]) for r in rows)
    named = "heads.exits=[default]" if defaults else "the modules by name in heads.exits"
    head = (f"# {cfg.model.arch} on {cfg.data.name}: {len(rows)} modules a head can read (shapes per timestep "
            f"and sample; |dL/dx|: at initialisation, relative to the last spiking layer's; default: {named})")
    lines = [f"{n:<{width}}  {layout:<6}  {shape:<14} {g:>9}  {d}".rstrip() for n, layout, shape, g, d in rows]
    return "\n".join([head, *lines, *tail])


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
    if args.gradients:
        from trainer.gradients import profile

        print(profile(cfg).table())
        return 0
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
