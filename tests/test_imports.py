"""The package's import graph, read from the source with ``ast`` (module-level and function-local imports alike):
no cycles, and in tuning/ only the online W&B runner imports a tracker client. Fast: nothing is imported.

``python -m tests.test_imports [PREFIX]`` prints the graph (e.g. ``cxrtrack.tuning``)."""

from __future__ import annotations

import ast
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the cxrtrack modules it imports, module -> the tracker clients it imports)."""
    modules = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
               for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    clients: dict[str, set[str]] = {}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in found:
                if target.split(".")[0] in ("mlflow", "wandb"):
                    clients.setdefault(name, set()).add(target.split(".")[0])
                if target in modules and target != name:
                    edges[name].add(target)
    return edges, clients


def test_the_package_has_no_import_cycle():
    edges, _ = import_graph()
    try:
        TopologicalSorter(edges).prepare()
    except CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_in_tuning_only_the_online_w_and_b_runner_imports_a_tracker_client():
    _, clients = import_graph()
    tuning_clients = {m: c for m, c in clients.items() if m.startswith("cxrtrack.tuning")}
    assert tuning_clients == {"cxrtrack.tuning.wandb_sweep": {"wandb"}}


if __name__ == "__main__":
    prefix = sys.argv[1] if len(sys.argv) > 1 else "cxrtrack"
    edges, clients = import_graph()
    for module in sorted(m for m in edges if m.startswith(prefix)):
        inner = sorted(t for t in edges[module] if t.startswith(prefix))
        uses = f"   [imports {', '.join(sorted(clients[module]))}]" if module in clients else ""
        print(f"{module} -> {', '.join(inner) or '-'}{uses}")
    try:
        TopologicalSorter(edges).prepare()
        print("no import cycle")
    except CycleError as exc:
        print("import cycle:", " -> ".join(exc.args[1]))
