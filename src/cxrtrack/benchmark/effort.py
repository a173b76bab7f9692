"""Integration effort, counted from the code: what each tracker backend costs to write and keep.

For each backend's modules (``tracking/mlflow_tracker.py`` + ``mlflow_store.py``, ``tracking/wandb_tracker.py``):

- lines of code (no blank lines, comments or docstrings);
- the distinct client API calls it makes (``mlflow.start_run``, ``wandb.Artifact``, ``run.log``, ...),
  found in its syntax tree;
- the workarounds it needed: every ``# workaround(<backend>): ...`` comment in the tracking package, with
  its file and line, so a workaround is listed exactly where the code implements it.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path
from typing import Any

import cxrtrack.tracking as tracking_pkg

BACKENDS = {"mlflow": ("mlflow_tracker.py", "mlflow_store.py"), "wandb": ("wandb_tracker.py",)}
# names under which a backend module reaches its client library
CLIENT_ROOTS = {
    "mlflow": {"mlflow": "mlflow", "self._mlflow": "mlflow", "client": "MlflowClient"},
    "wandb": {"wandb": "wandb", "self._wandb": "wandb", "self.run": "run", "self.run.config": "run.config",
              "self.run.summary": "run.summary"},
}


def code_lines(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    tree = ast.parse(source)
    doc_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                doc_lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.ENDMARKER):
            continue
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - doc_lines)


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def client_calls(source: str, roots: dict[str, str], package: str) -> list[str]:
    """Distinct uses of the client library: calls (``self._mlflow.log_metrics(...)`` -> ``mlflow.log_metrics``,
    also of names imported from it) and item assignments (``self.run.summary[k] = v``)."""
    tree = ast.parse(source)
    imported = {}  # name -> module.name, for `from mlflow.models import infer_signature`
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    calls = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Subscript) and (owner := _dotted(target.value)) in roots:
                    calls.add(f"{roots[owner]}[...] =")
            continue
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in imported:
            calls.add(imported[name])
            continue
        head = (name or "").split(".")[0]
        if name and head in imported:  # a module imported from the package: wbauth.read_netrc_auth
            calls.add(imported[head] + name[len(head):])
            continue
        if not name or "." not in name:
            continue
        owner, attr = name.rsplit(".", 1)
        for root, label in sorted(roots.items(), key=lambda kv: -len(kv[0])):  # longest root first
            if owner == root or owner.startswith(root + "."):
                calls.add(f"{label}{owner[len(root):]}.{attr}")
                break
    return sorted(calls)


def workarounds(source: str, backend: str) -> list[dict[str, Any]]:
    """``# workaround(<backend>): text`` comments (continued on the following comment lines)."""
    out: list[dict[str, Any]] = []
    tag = f"workaround({backend}):"
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        if tag in tok.string:
            out.append({"line": tok.start[0], "text": tok.string.split(tag, 1)[1].strip()})
        elif (out and out[-1]["line"] + out[-1].get("lines", 1) == tok.start[0] and tok.line.lstrip().startswith("#")
              and "workaround(" not in tok.string):
            out[-1]["text"] += " " + tok.string.lstrip("# ").strip()  # a continuation line
            out[-1]["lines"] = out[-1].get("lines", 1) + 1
    for item in out:
        item.pop("lines", None)
    return out


def measure_effort() -> dict[str, Any]:
    folder = Path(tracking_pkg.__file__).parent
    result = {}
    for backend, filenames in BACKENDS.items():
        sources = [(folder / name).read_text() for name in filenames]
        calls = sorted({c for source in sources for c in client_calls(source, CLIENT_ROOTS[backend], backend)})
        found = [{"file": p.name, **w}
                 for p in sorted(folder.glob("*.py")) for w in workarounds(p.read_text(), backend)]
        result[backend] = {"file": ", ".join(f"src/cxrtrack/tracking/{name}" for name in filenames),
                           "code_lines": sum(code_lines(source) for source in sources),
                           "client_calls": calls, "n_client_calls": len(calls), "workarounds": found}
    backend_files = {name for names in BACKENDS.values() for name in names}
    shared = [p for p in sorted(folder.glob("*.py")) if p.name not in backend_files]
    result["shared"] = {"files": [f"src/cxrtrack/tracking/{p.name}" for p in shared],
                        "code_lines": sum(code_lines(p.read_text()) for p in shared)}
    return result
