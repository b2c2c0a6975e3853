"""Write the generated reference pages from the code: the config schema, the space schema and the commands.

    python docs/gen_reference.py            write docs/reference/config.md, space.md and cli.md
    python docs/gen_reference.py --check    write nothing; exit 1 naming each page that differs from the code

Sources:
- ``docs/reference/config.md``: the pydantic model ``trainer.config.Config`` (every section and field).
- ``docs/reference/space.md``: the pydantic models of ``search.space`` (``SPACE_MODELS``, below).
- ``docs/reference/cli.md``: each command module's ``make_parser()``: ``search.cli.COMMANDS`` (the
  subcommands of ``snn-search``) and ``trainer.__main__`` (``snn-train``).
- ``docs/benchmarks/gpu.md``: the newest GPU run's JSON under ``benchmarks/results/`` (``benchmarks/gpu.py``).

``render_models`` renders any pydantic model class as markdown tables, one per model it reaches (nested
models, lists and mappings of models, unions and discriminated unions); ``render_parser`` does the same
for an ``argparse.ArgumentParser``. Neither reads the terminal width, so the output is the same everywhere.
A field's description is its ``Field(description=...)``: the one text the schema, an IDE, ``--help`` and
these pages share.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clone that is not pip-installed
    sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

COMMAND = "python docs/gen_reference.py"

# The space file's root models, by name in search.space (e.g. ["SpaceFile"]): the page starts with them and
# recurses into every model they use. Empty: found in search.space, see space_models().
SPACE_MODELS: list[str] = ["SpaceFile"]

# ---------------------------------------------------------------- markdown helpers

def md_text(text: str) -> str:
    """Docstring or help text as markdown: ``x`` becomes `x`; <, >, * and | outside code are escaped.

    Lines indented by four spaces are code blocks in markdown and stay as they are."""
    return "\n".join(line if line.startswith("    ") else _md_line(line) for line in text.split("\n"))


def _md_line(text: str) -> str:
    text = re.sub(r"``(.+?)``", r"`\1`", text)
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        parts[i] = (parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", r"\*")
                    .replace("|", r"\|"))
    return "".join(parts)


def cell(text: str) -> str:
    """One table cell: no line breaks, and no code span holding a pipe (GitHub splits the cell there, mkdocs
    would print a backslash), which becomes escaped plain text instead."""
    text = " ".join(text.split())

    def plain(match: re.Match) -> str:
        text = re.sub(r"([\\`*_\[\]|])", r"\\\1", match.group(1))
        return text.replace("<", "&lt;").replace(">", "&gt;")

    return re.sub(r"`([^`]*\|[^`]*)`", plain, text)


def code(value: Any) -> str:
    """A value as YAML would spell it, in backticks."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        text = value if value else '""'
    elif isinstance(value, Path):
        text = str(value)
    else:
        try:
            text = json.dumps(value, default=str)
        except (TypeError, ValueError):
            text = repr(value)
    return f"`{text}`"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) or " " for c in row) + " |" for row in rows]
    return lines


def docstring(obj: Any) -> str:
    """A class's own docstring, else the nearest one of its bases (not pydantic's, not ``object``'s)."""
    if not isinstance(obj, type):
        doc = getattr(obj, "__doc__", None)
        return md_text(inspect.cleandoc(doc)) if doc else ""
    for klass in obj.__mro__:
        if klass is object or klass.__module__.split(".")[0] in ("pydantic", "builtins", "typing"):
            continue
        if doc := klass.__dict__.get("__doc__"):
            return md_text(inspect.cleandoc(doc))
    return ""


def anchor(cls: type) -> str:
    return cls.__name__.lower()


# ---------------------------------------------------------------- pydantic models

def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def discriminator_of(meta: Iterable[Any]) -> str | None:
    for m in meta:
        disc = getattr(m, "discriminator", None)
        if isinstance(disc, str):
            return disc
        if disc is not None and isinstance(getattr(disc, "discriminator", None), str):  # pydantic.Discriminator
            return disc.discriminator
    return None


def constraints(meta: Iterable[Any]) -> list[str]:
    """annotated-types / pydantic metadata -> ">= 1", "< 1", "pattern `...`", ..."""
    out = []
    for m in meta:
        for attr, fmt in (("gt", "> {}"), ("ge", ">= {}"), ("lt", "< {}"), ("le", "<= {}"),
                          ("multiple_of", "multiple of {}"), ("min_length", "length >= {}"),
                          ("max_length", "length <= {}"), ("pattern", "pattern `{}`")):
            value = getattr(m, attr, None)
            if value is not None:
                out.append(fmt.format(value))
    return out


def type_md(tp: Any, found: list[type]) -> str:
    """A type annotation in words; every pydantic model met on the way is appended to ``found``."""
    if tp is None or tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if is_model(tp):
        if tp not in found:
            found.append(tp)
        return f"[{tp.__name__}](#{anchor(tp)})"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(code(m.value) for m in tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        inner = type_md(args[0], found)
        extra = constraints(args[1:])
        disc = discriminator_of(args[1:])
        if disc:
            extra.append(f"chosen by `{disc}`")
        return f"{inner} ({', '.join(extra)})" if extra else inner
    if origin is typing.Literal:
        return "one of " + ", ".join(code(a) for a in args) if len(args) > 1 else code(args[0])
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        words = " or ".join(type_md(a, found) for a in rest)
        return f"{words} or null" if len(rest) < len(args) else words
    if origin in (list, set, frozenset, tuple, typing.Sequence, Iterable):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "tuple of (" + ", ".join(type_md(a, found) for a in args) + ")"
        return f"list of {type_md(args[0], found)}" if args else "list"
    if origin in (dict, typing.Mapping):
        return f"mapping of {type_md(args[0], found)} to {type_md(args[1], found)}" if args else "mapping"
    if tp is Path:
        return "path"
    return getattr(tp, "__name__", str(tp))


def default_md(field: Any) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory that takes the validated data
            return "computed"
        return "its defaults" if isinstance(value, BaseModel) else code(value)
    if field.default is PydanticUndefined:
        return "required"
    return code(field.default)


def render_model(cls: type[BaseModel], path: str, found: list[type]) -> list[str]:
    title = f"`{path}`: {cls.__name__}" if path else cls.__name__
    lines = [f"## {title} {{#{anchor(cls)}}}", ""]
    if doc := docstring(cls):
        lines += [doc, ""]
    rows = []
    for name, field in cls.model_fields.items():
        if field.exclude:  # not part of the file
            continue
        kind = type_md(field.annotation, found)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("enum"):
            kind = "one of " + ", ".join(code(v) for v in extra["enum"])
        if field.discriminator is not None:
            disc = field.discriminator if isinstance(field.discriminator, str) else discriminator_of([field])
            kind += f" (chosen by `{disc}`)" if disc else ""
        text = field.description or ""
        rows.append([f"`{field.alias or name}`", kind, default_md(field), ", ".join(constraints(field.metadata)),
                     md_text(text)])
    if rows:
        lines += table(["key", "type", "default", "constraints", "description"], rows)
    else:
        lines.append("No fields.")
    return lines + [""]


def model_paths(root: type[BaseModel], prefix: str = "") -> dict[type, str]:
    """Each model reachable from ``root`` -> the first dotted path where a file uses it (``space.<key>``)."""
    paths: dict[type, str] = {root: prefix}
    todo = [(root, prefix)]
    while todo:
        cls, path = todo.pop(0)
        for name, field in cls.model_fields.items():
            if field.exclude:
                continue
            here = f"{path}.{field.alias or name}" if path else (field.alias or name)
            for tp, suffix in walk(field.annotation):
                if tp not in paths:
                    paths[tp] = here + suffix
                    todo.append((tp, here + suffix))
    return paths


def walk(tp: Any, suffix: str = "") -> list[tuple[type, str]]:
    """The models inside an annotation, with how a path goes into them (``[]`` for items, ``.<key>``)."""
    if is_model(tp):
        return [(tp, suffix)]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return walk(args[0], suffix)
    if origin in (dict, typing.Mapping) and len(args) == 2:
        return walk(args[1], suffix + ".<key>")
    if origin in (list, set, frozenset, tuple, typing.Sequence):
        return [m for a in args if a is not Ellipsis for m in walk(a, suffix + "[]")]
    return [m for a in args for m in walk(a, suffix)]


def render_models(roots: list[type[BaseModel]]) -> list[str]:
    """Markdown for ``roots`` and every model they reach, each once, roots first, then in order of use."""
    paths: dict[type, str] = {}
    for root in roots:
        for cls, path in model_paths(root).items():
            paths.setdefault(cls, path)
    done: list[type] = []
    queue: list[type] = list(roots)
    lines: list[str] = []
    while queue:
        cls = queue.pop(0)
        if cls in done:
            continue
        done.append(cls)
        found: list[type] = []
        lines += render_model(cls, paths.get(cls, ""), found)
        queue += [m for m in found if m not in done and m not in queue]
    return lines


def header(title: str, source: str) -> list[str]:
    return [f"<!-- Generated by `{COMMAND}` from {source}: edit the code, then run the command. -->",
            f"# {title}", "",
            f"*Generated from {source} by `{COMMAND}`; a test fails when this page is out of date.*", ""]


def config_page() -> str:
    from trainer.config import Config

    lines = header("Trainer config", "`trainer.config.Config`")
    lines += [
        "One format for `snn-train --config`, a space file's `base`, `--base` and exported configs. Set any key",
        "from the command line with a dotted override: `--set data.timesteps=8` (the value is read as YAML, so",
        "`--set heads.exits=[layer1.0]` works). An unknown key or a bad value exits with code 2 and one line, e.g.",
        "`error: config: unknown key 'optim.lrr' (allowed: name, lr, momentum, ...)`.",
        "",
        "Checked beyond the types below (`trainer.config.build`): `data.cutout` only with `cifar10` or `cifar100`,",
        "`model.kwargs` only with an import path. Before anything trains, the model runs once on a dry batch",
        "of the data set's shape (`trainer.probe`): it must build, run and return logits, and each of",
        "`heads.exits` must be one of its modules whose output a head can read.",
        "",
    ]
    return "\n".join(lines + render_models([Config])).rstrip() + "\n"


def space_models() -> list[type[BaseModel]]:
    """``SPACE_MODELS``, else the roots among the public pydantic models defined in ``search.space``: those
    that no other one uses and that are no other one's base class (an abstract ``Param`` is shown through
    its kinds), in source order. None while the module has no pydantic models."""
    module = importlib.import_module("search.space")
    if SPACE_MODELS:
        return [getattr(module, name) for name in SPACE_MODELS]
    own = [obj for name, obj in vars(module).items()
           if is_model(obj) and obj.__module__ == module.__name__ and not name.startswith("_")]
    own = [m for m in own if not any(o is not m and issubclass(o, m) for o in own)]
    used = {m for root in own for m in model_paths(root) if m is not root}
    roots = [m for m in own if m not in used]

    def line(cls: type) -> int:
        try:
            return inspect.getsourcelines(cls)[1]
        except (OSError, TypeError):
            return 0

    return sorted(roots, key=line)


def space_page() -> str:
    lines = header("Space file", "the pydantic models of `search.space`")
    models = space_models()
    lines += ["A space file has the sections `study`, `base` (a [trainer config](config.md)), `final` and `space`;",
              "[Write a space](../how-to/write-a-space.md) shows one with every key.", ""]
    if not models:
        lines += ["`search.space` defines no pydantic models yet, so there are no schema tables here: the keys",
                  "are listed in [Write a space](../how-to/write-a-space.md).", ""]
    return "\n".join(lines + render_models(models)).rstrip() + "\n"


# ---------------------------------------------------------------- argparse parsers

def _type_name(action: argparse.Action) -> str:
    tp = action.type
    if tp is None:
        return ""
    return {Path: "path"}.get(tp, getattr(tp, "__name__", ""))


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "flag"
    if action.choices is not None:
        return "one of " + ", ".join(code(c) for c in action.choices)
    metavar = action.metavar if isinstance(action.metavar, str) else (
        action.dest.upper() if action.option_strings else action.dest)
    words = f"`{metavar}`"
    if kind := _type_name(action):
        words += f" ({kind})"
    if action.nargs in ("*", "+"):
        words += " ..."
    return words


def _default(action: argparse.Action) -> str:
    value = action.default
    if action.required or value is None or value is argparse.SUPPRESS or (action.nargs == 0 and value is False):
        return ""
    if isinstance(action, argparse._AppendAction) and value == []:
        return ""
    return code(value)


def _help(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    text = action.help or ""
    if "%" in text:
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params["prog"] = parser.prog
        text = text % params
    text = md_text(text)
    if action.required and action.option_strings:
        text = (text + " " if text else "") + "Required."
    if isinstance(action, argparse._AppendAction) and "repeatable" not in text.lower():
        text = (text + " " if text else "") + "Repeatable."
    return text


def render_parser(parser: argparse.ArgumentParser, level: int = 3) -> list[str]:
    """Each argument group of ``parser`` as a table: option, value, default, description (no -h, no hidden)."""
    lines: list[str] = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        rows = [[", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.dest}`", _value(a), _default(a),
                 _help(a, parser)] for a in actions]
        lines += [f"{'#' * level} {group.title[:1].upper() + group.title[1:]}", ""]
        lines += table(["argument", "value", "default", "description"], rows) + [""]
    return lines


def commands() -> list[tuple[str, str, str]]:
    """(command, module, the same as a script) for every command with a ``make_parser``."""
    from search.cli import COMMANDS

    out = [(f"snn-search {name}", module, f"python {module.replace('.', '/')}.py") for name, command in COMMANDS.items() for module in [command.module]]
    return out + [("snn-train", "trainer.__main__", "python -m trainer")]


def cli_page() -> str:
    lines = header("Commands", "each command's `make_parser()`")
    listed = commands()
    lines += ["`pip install -e .` installs two commands: `snn-search` (subcommands below) and `snn-train`. Each",
              "also runs as a script, so `snn-search run --space ...` and `python search/run.py --space ...` are",
              "the same. Every command takes `-h` / `--help`, and answers a bad flag or input with exit code 2",
              "and one line.", ""]
    lines += table(["command", "same as", "what"],
                   [[f"[`{cmd}`](#{cmd.replace(' ', '-')})", f"`{script}`",
                     md_text(first_sentence(importlib.import_module(module).__doc__ or ""))]
                    for cmd, module, script in listed]) + [""]
    for cmd, module, script in listed:
        parser = importlib.import_module(module).make_parser()
        lines += [f"## {cmd} {{#{cmd.replace(' ', '-')}}}", "", f"Also: `{script}`.", ""]
        if parser.description:
            lines += [md_text(inspect.cleandoc(parser.description)), ""]
        lines += render_parser(parser)
    return "\n".join(lines).rstrip() + "\n"


def first_sentence(doc: str) -> str:
    """What a command does, from its module docstring: the first sentence, less a leading usage example."""
    text = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    text = re.sub(r"^``[^`]*``( \(or ``[^`]*``\))?: ", "", text)
    match = re.match(r"(.+?[.:])(\s|$)", text)
    text = (match.group(1) if match else text).rstrip(":.")
    return text[:1].upper() + text[1:] + "."


# ---------------------------------------------------------------- the GPU checks

def gpu_page() -> str:
    """The GPU checks' results, rendered by ``benchmarks/gpu.py`` (imported from beside this file: ``ROOT``
    is where the results are read, which a test moves)."""
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:  # its scripts import each other by name
        sys.path.insert(0, benchmarks)
    import gpu

    results = ROOT / "benchmarks" / "results"
    run = gpu.newest(results)
    source = f"`benchmarks/results/{run.name}`" if run else "the GPU runs' JSON in `benchmarks/results/`"
    return "\n".join(header("GPU checks", source) + gpu.page(results)).rstrip() + "\n"


# ---------------------------------------------------------------- main

PAGES: dict[str, Callable[[], str]] = {
    "docs/reference/config.md": config_page,
    "docs/reference/space.md": space_page,
    "docs/reference/cli.md": cli_page,
    "docs/benchmarks/gpu.md": gpu_page,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each page that differs from what the code generates")
    args = parser.parse_args(argv)
    stale = []
    for rel, make in PAGES.items():
        path, text = ROOT / rel, make()
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {rel}")
    if stale:
        for rel in stale:
            print(f"stale: {rel} differs from what the code generates (run: {COMMAND})", file=sys.stderr)
        return 1
    if args.check:
        print(f"{len(PAGES)} generated pages are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
