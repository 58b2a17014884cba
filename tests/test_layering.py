"""Dependencies point one way (DESIGN.md, Layout): guidance and data import nothing of ours; losses and models import
only guidance; train.runtime never imports a method, evaluation or the commands above them; train.methods never
imports the CLI, export or evaluation; train.evaluation never imports a method or a command. Imports inside functions
count too. The project's own modules then cannot import each other in a circle across these layers."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("guidance", "data", "losses", "models", "train", "bench", "configs", "tests")
TRAIN_TOP = ("train.cli", "train.sampling_commands", "train.fit", "train.demo", "train.export", "train.model_card",
             "train.digits_pipeline", "train.__main__")

# package -> the project packages (module prefixes) its files may import, besides their own package
ALLOWED = {
    "guidance": (),
    "data": (),
    "losses": ("guidance",),
    "models": ("guidance",),
    "train.runtime": ("guidance", "models"),
    "train.methods": ("guidance", "models", "losses", "data", "train.runtime"),
    "train.evaluation": ("guidance", "models", "data", "train.runtime"),
}


def _imports(path: Path) -> list[str]:
    """Absolute module names imported anywhere in the file (relative imports resolved against its package)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.append(f"{base}.{node.module}" if node.module else base)
            else:
                out.append(node.module or "")
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_below_it(package):
    folder = ROOT / package.replace(".", "/")
    files = sorted(folder.rglob("*.py"))
    assert files, f"no files in {folder}"
    bad = []
    for f in files:
        for name in _imports(f):
            if name.split(".")[0] not in OURS or _within(name, package):
                continue
            if not any(_within(name, allowed) for allowed in ALLOWED[package]):
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_commands_are_the_only_top_level_train_modules():
    """train/ holds the sub-packages and, above them, the commands: nothing else lives at its top level."""
    top = {f"train.{p.stem}" for p in (ROOT / "train").glob("*.py")} - {"train.__init__"}
    assert top <= set(TRAIN_TOP), sorted(top - set(TRAIN_TOP))
