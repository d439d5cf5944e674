"""The library's shape, as medlm/README.md promises it: no import cycle among medlm's modules,
imports at the top of each module, and no function longer than a screen."""

import ast
from pathlib import Path

MEDLM = Path(__file__).resolve().parent.parent / "medlm"
SCREEN = 60  # lines a function may take, its docstring included
LOOP = 160  # the training loop's, which stays in one function to read top to bottom


def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in MEDLM.glob("*.py")}


def imported(node: ast.AST) -> set[str]:
    """The medlm modules an import statement names."""
    if isinstance(node, ast.ImportFrom) and node.module == "medlm":
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medlm."):
        return {node.module.split(".")[1]}
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[1] for alias in node.names
                if alias.name.startswith("medlm.")}
    return set()


def functions(tree: ast.Module):
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (module -> modules it imports) as a path, or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name):], name]
        if name in done:
            return None
        for dependency in sorted(graph[name]):
            if cycle := visit(dependency, [*path, name]):
                return cycle
        done.add(name)
        return None

    return next((cycle for name in sorted(graph) if (cycle := visit(name, []))), None)


def test_no_import_cycle_among_medlm_modules():
    trees = modules()
    graph = {name: set().union(*map(imported, ast.walk(tree))) & set(trees)
             for name, tree in trees.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_medlm_imports_are_at_the_top_of_each_module():
    inside = [f"{name}.py:{node.lineno}" for name, tree in modules().items()
              for function in functions(tree) for node in ast.walk(function) if imported(node)]
    assert not inside, f"medlm imports inside functions (move them to the top): {inside}"


def test_every_function_fits_on_a_screen():
    long = sorted((node.end_lineno - node.lineno + 1, f"{name}.py:{node.name}")
                  for name, tree in modules().items() for node in functions(tree)
                  if node.end_lineno - node.lineno + 1
                  > (LOOP if f"{name}.py:{node.name}" == "train.py:fit" else SCREEN))
    assert not long, f"functions over {SCREEN} lines (split them): {long}"


def test_the_checks_fail_on_what_they_look_for():
    """The walkers see a cycle, an inner import and a long function where there is one."""
    assert find_cycle({"data": {"metrics"}, "metrics": {"generate"}, "generate": {"data"}}) == [
        "data", "metrics", "generate", "data"]
    assert find_cycle({"data": {"text"}, "metrics": {"text"}, "text": set()}) is None
    tree = ast.parse("def f():\n    from medlm.data import x\n" + "    y = 1\n" * SCREEN)
    assert [imported(node) for node in ast.walk(tree) if imported(node)] == [{"data"}]
    (function,) = functions(tree)
    assert function.end_lineno - function.lineno + 1 > SCREEN
