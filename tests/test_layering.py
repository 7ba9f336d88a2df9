"""Imports inside the package only point down the layer list (no back-edges)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mixsd_edit"

# data -> infrastructure -> methods -> evaluation -> editor/adapter -> cli/bench
LAYERS = [
    ("data",),
    ("hparams", "registry", "weights", "prompting", "training", "models", "lm_utils"),
    ("methods",),
    ("evaluation",),
    ("editor", "easyedit_adapter"),
    ("cli", "bench"),
]


def _layer(dotted: str) -> int | None:
    parts = dotted.split(".")
    if parts[0] != "mixsd_edit" or len(parts) < 2:
        return None
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"module {dotted} is in no layer: add it to LAYERS")


def test_no_back_edges():
    bad = []
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts)
        if mod.endswith(".__init__"):
            mod = mod[: -len(".__init__")]
        if mod == "mixsd_edit":
            continue
        mine = _layer(mod)
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                lt = _layer(t)
                if lt is not None and lt > mine:
                    bad.append(f"{mod} (layer {mine}) imports {t} (layer {lt})")
    assert not bad, "\n".join(bad)


def test_import_has_no_side_effects(tmp_path):
    import subprocess
    import sys

    code = ("import random, torch; a = random.getstate(); t = torch.random.get_rng_state();"
            "import mixsd_edit, mixsd_edit.editor, mixsd_edit.cli;"
            "assert random.getstate() == a and torch.equal(torch.random.get_rng_state(), t);"
            "import os; assert os.listdir('.') == [], os.listdir('.')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(PKG.parent)})
    assert r.returncode == 0, r.stderr
