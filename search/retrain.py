"""Retrain an exported config into the final model: ``snn-search retrain studies/<name>/best.yaml``.

Applies the study's ``final`` overrides (from the file's provenance: the base's full ``optim.epochs``
unless the space said otherwise), then any ``--set``. Trains on training + validation data (the
validation split ranked the trials; the final model does not need it) and evaluates the official test
set once, at the end: the only place the test split is read. Saves the stripped inference model
(``model.pt``) and ``metrics.json`` (last epoch, test accuracy, synaptic operations and energy per test
sample) in ``--out`` (default: ``retrain/`` next to the config file).
"""

from __future__ import annotations

import sys
from pathlib import Path

import json

from trainer.config import ConfigError, build, parse_override, read_yaml, set_dotted, with_values
from trainer.fit import fit
from trainer.errors import Parser, command


def final_config(path: Path, overrides: list[str], out_dir: Path):
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a trainer config mapping")
    build(data, str(path))  # the file as written, as the trainer validates any config: final must not hide a bad value
    data = with_values(data, (data.get("provenance") or {}).get("final") or {})
    set_dotted(data, "data.val_fraction", 0)  # train + validation
    for item in overrides:
        set_dotted(data, *parse_override(item))
    set_dotted(data, "run.out_dir", str(out_dir))
    return build(data, str(path))


def make_parser(prog: str = "snn-search retrain") -> Parser:
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument("config", type=Path, help="an exported config (snn-search export)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="default: <config dir>/retrain")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    out_dir = args.out or args.config.parent / "retrain"
    cfg = final_config(args.config, args.overrides, out_dir)
    data = "train + validation" if cfg.data.val_fraction == 0 else f"train ({cfg.data.val_fraction:g} held out)"
    print(f"retraining {args.config} for {cfg.optim.epochs} epochs on {cfg.data.name} {data}; the test set "
          f"is evaluated once, at the end -> {out_dir}", flush=True)
    result = fit(cfg, progress=True)
    metrics = {**result.history[-1].metrics, **result.test, "epochs": len(result.history),
               "model": str(result.model_path)}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
