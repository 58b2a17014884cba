"""data/ depends on nothing else in the project (DESIGN.md, Layout): no import of guidance, models, losses, train."""
import ast
import pathlib

import data

PROJECT_PACKAGES = {"guidance", "models", "losses", "train", "configs", "bench"}


def test_data_imports_no_other_project_package():
    for file in pathlib.Path(data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            assert not {n.split(".")[0] for n in names} & PROJECT_PACKAGES, f"{file.name} imports {names}"
