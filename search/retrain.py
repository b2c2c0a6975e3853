"""Retrain an exported config at full length: ``python search/retrain.py studies/<name>/best.yaml``.

Applies the study's ``final`` overrides (from the file's provenance), then any ``--set``; saves the
stripped inference model (``model.pt``) and ``metrics.json`` (final and test metrics) in ``--out``
(default: ``retrain/`` next to the config file).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the project, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402

from trainer.config import ConfigError, build, parse_override, read_yaml, set_dotted, with_values  # noqa: E402
from trainer.fit import fit  # noqa: E402
from trainer.heads import UnknownExitError  # noqa: E402


def final_config(path: Path, overrides: list[str], out_dir: Path):
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a trainer config mapping")
    data = with_values(data, (data.get("provenance") or {}).get("final") or {})
    for item in overrides:
        set_dotted(data, *parse_override(item))
    set_dotted(data, "run.out_dir", str(out_dir))
    return build(data, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python search/retrain.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="an exported config (search/export.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="default: <config dir>/retrain")
    args = parser.parse_args(argv)
    out_dir = args.out or args.config.parent / "retrain"
    try:
        cfg = final_config(args.config, args.overrides, out_dir)
        print(f"retraining {args.config} for {cfg.optim.epochs} epochs -> {out_dir}", flush=True)
        result = fit(cfg, progress=True)
    except (ConfigError, UnknownExitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = {**result.history[-1].metrics, **result.test, "best_val_acc": result.best_val_acc,
               "epochs": len(result.history), "model": str(result.model_path)}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
