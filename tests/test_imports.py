"""The import graph of qwenvl/ and tools/, read with ``ast`` (nothing is imported).

- no cycle among qwenvl/ modules, counting imports at module level and inside functions (and
  the parent packages an import runs first, except a module's own ancestors);
- inside a function of qwenvl/ only lazy imports of optional or heavy third-party packages
  (``LAZY_ALLOWED``) and of the standard library: an import of a qwenvl module there would hide
  a cycle;
- no tool imports the training entry point ``qwenvl/train/train_qwen.py`` to borrow a helper.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imported inside functions on purpose: optional (decoders, trackers, quantisation, kernels) or
# heavy packages that a command only needs on one path.
LAZY_ALLOWED = frozenset({
    "av", "bitsandbytes", "datasets", "decord", "deepspeed", "filelock", "flash_attn", "liger_kernel", "peft",
    "pyarrow", "torch", "torchcodec", "tqdm", "transformers", "wandb", "yaml",
})
# Lazy imports in files this test's author may not edit; each must go (move it to the top of its
# module), then its entry here. Not cycle dodges: neither imported module imports qwenvl.
PENDING: set[tuple[str, str]] = set()  # (file, import) allowed inside a function for now


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(folder: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / folder).rglob("*.py"))}


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import statement of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(sub) for sub in ast.walk(node) if sub is not node)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import submodule` imports the submodule.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out += [(name, id(node) in inside, node.lineno) for name in dict.fromkeys(names)]
    return out


def with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: an import runs the parent packages first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def test_no_cycle_among_qwenvl_modules():
    known = modules("qwenvl")
    graph = {name: set() for name in known}
    for name, path in known.items():
        for target, _, _ in imports(path, known):
            # A module's own ancestors are already being imported when it runs: not an edge.
            graph[name].update(m for m in with_parents(target) if m in known and m not in with_parents(name))
    # Depth-first search; a grey node reached again closes a cycle.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_inside_functions_are_lazy_third_party_only():
    known = modules("qwenvl")
    stdlib = set(sys.stdlib_module_names)
    found = []
    for name, path in known.items():
        rel = str(path.relative_to(ROOT))
        for target, lazy, line in imports(path, known):
            top = target.split(".")[0]
            if lazy and top not in LAZY_ALLOWED and top not in stdlib and (rel, target) not in PENDING:
                found.append(f"{rel}:{line}: {target}")
    assert not found, "imports inside functions (move them to the top of the module): " + ", ".join(found)


def test_no_tool_imports_the_training_entry_point():
    known = {**modules("qwenvl"), **modules("tools")}
    found = [f"{path.relative_to(ROOT)}:{line}" for name, path in modules("tools").items()
             for target, _, line in imports(path, known) if target == "qwenvl.train.train_qwen"]
    assert not found, "tools import qwenvl/train/train_qwen.py: " + ", ".join(found)


def test_the_checks_see_what_they_check():
    """Guard the guards: the parser finds a lazy import, a relative import and a package's submodule."""
    known = modules("qwenvl")
    lazy = imports(ROOT / "qwenvl/data/video.py", known)
    assert ("decord", True) in [(t, f) for t, f, _ in lazy]
    chat = [t for t, _, _ in imports(ROOT / "qwenvl/data/chat.py", known)]
    assert "qwenvl.models" in chat and "qwenvl.data.vision" in chat
    assert "qwenvl.data.chat" in [t for t, _, _ in imports(ROOT / "qwenvl/data/data_qwen.py", known)]
