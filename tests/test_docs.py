"""The docs stay true to the code: the generated reference pages are current, the site builds with
``mkdocs build --strict``, the README stays a front door, and no relative link points at nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import gen_reference  # noqa: E402

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)  # [name]: target
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(text: str) -> list[str]:
    """Link targets outside code, without URLs and in-page anchors."""
    text = CODE.sub("", FENCE.sub("", text))
    targets = LINK.findall(text) + REF_LINK.findall(text)
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#|//)", t, re.I)]


def test_generated_reference_pages_are_current() -> None:
    out = subprocess.run([sys.executable, "docs/gen_reference.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"{out.stderr.strip()}\n(regenerate: python docs/gen_reference.py)"


def test_check_names_a_page_edited_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """--check passes on freshly generated pages and fails, naming the page, once one line of one of them is
    edited by hand (in a scratch copy of the docs folder)."""
    monkeypatch.setattr(gen_reference, "ROOT", tmp_path)
    assert gen_reference.main([]) == 0
    assert gen_reference.main(["--check"]) == 0
    page = tmp_path / "docs/reference/config.md"
    page.write_text(page.read_text().replace("| `timesteps` |", "| `timesteps` (edited) |"))
    capsys.readouterr()
    assert gen_reference.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/reference/config.md" in err and "space.md" not in err and "cli.md" not in err


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines (at most 150: the rest belongs in docs/)"


def test_every_relative_link_points_to_a_file() -> None:
    broken = []
    for path in markdown_files():
        for target in relative_links(path.read_text()):
            file = target.split("#", 1)[0]
            if file and not (path.parent / file).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_finder_sees_links_and_skips_code_and_urls() -> None:
    text = ("[a](docs/a.md) ![b](img/b.png \"title\") [c](https://x.org/c.md) [d](#anchor) `[e](e.md)`\n"
            "```\n[f](f.md)\n```\n[g]: docs/g.md\n")
    assert relative_links(text) == ["docs/a.md", "img/b.png", "docs/g.md"]


class _Leaf(BaseModel):
    """A leaf."""

    size: int = Field(3, ge=1, description="how big")
    mode: Literal["a", "b"] = Field("a", description="a comment")


class _Kind1(BaseModel):
    type: Literal["one"]
    leaf: _Leaf = Field(default_factory=_Leaf)


class _Kind2(BaseModel):
    type: Literal["two"]
    names: list[str] | None = None


class _Root(BaseModel):
    items: dict[str, Annotated[_Kind1 | _Kind2, Field(discriminator="type")]]
    lam: float = Field(0.5, alias="lambda", gt=0, le=1)


def test_render_models_recurses_into_nested_models_and_discriminated_unions() -> None:
    text = "\n".join(gen_reference.render_models([_Root]))
    for heading in ("## _Root {#_root}", "## `items.<key>`: _Kind1 {#_kind1}", "## `items.<key>`: _Kind2 {#_kind2}",
                    "## `items.<key>.leaf`: _Leaf {#_leaf}"):
        assert heading in text
    assert text.count("## ") == 4  # each model once
    assert "mapping of str to [_Kind1](#_kind1) or [_Kind2](#_kind2) (chosen by `type`)" in text
    assert "| `lambda` | float | `0.5` | > 0, <= 1 |" in text
    assert "| `size` | int | `3` | >= 1 | how big |" in text
    assert "| `mode` | one of `a`, `b` | `a` |   | a comment |" in text
    assert "| `type` | `one` | required |" in text and "| `names` | list of str or null | `null` |" in text


def test_every_field_of_the_config_and_the_space_file_has_its_description():
    """``Field(description=...)`` is the one text the schema, an IDE, ``--help`` and the generated pages
    share: no field is without one, and the generator reads nothing else."""
    import inspect

    from pydantic import BaseModel

    import search.space
    import trainer.config

    missing = [f"{cls.__name__}.{name}" for module in (trainer.config, search.space)
               for _, cls in inspect.getmembers(module, inspect.isclass)
               if issubclass(cls, BaseModel) and cls.__module__ == module.__name__
               for name, field in cls.model_fields.items() if not field.description and not field.exclude]
    assert not missing, missing
    source = (ROOT / "docs" / "gen_reference.py").read_text()
    assert "FALLBACK_DESCRIPTIONS" not in source and "tokenize" not in source


def test_the_use_the_trained_model_snippet_runs_and_scores_the_test_split(tmp_path, capsys):
    """The how-to's code, as written, on a model.pt trained here: it loads, predicts and scores."""
    from trainer.config import load
    from trainer.fit import fit

    cfg = load(None, ["data.limit=64", "model.width=4", "optim.epochs=1", "data.timesteps=2",
                      f"run.out_dir={tmp_path}", "heads.exits=[default]"])
    result = fit(cfg)
    page = (ROOT / "docs" / "how-to" / "use-the-trained-model.md").read_text()
    snippet = page.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'path = "studies/lambda_decay/retrain/model.pt"' in snippet
    exec(snippet.replace("studies/lambda_decay/retrain/model.pt", str(tmp_path / "model.pt")), {})
    printed = capsys.readouterr().out
    accuracy, count = float(printed.split()[2]), int(printed.split()[4])
    assert count == 64 and accuracy == round(result.test["test_acc"], 4)  # the same test split, scored alike
