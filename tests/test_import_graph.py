"""No import cycle in resfuse/, kernels/ (installed as resfuse.kernels) or
bench/: the import graph is read from the source with ``ast``, every
import at any depth (inside functions and methods too; only the body of an
``if TYPE_CHECKING:`` is exempt), relative imports resolved, ``from pkg
import name`` counted as importing the submodule ``pkg.name`` where one
exists (else the package). Moving an import into a function does not hide
a cycle from this test."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: source folder -> the package it is imported as
PACKAGES = {"resfuse": "resfuse", "kernels": "resfuse.kernels", "bench": "bench"}


def _modules(root, packages):
    """{module name: (path, is_package)} of every .py file under the folders."""
    mods = {}
    for folder, pkg in packages.items():
        for d, _, files in os.walk(os.path.join(root, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.join(root, folder))[:-3].split(os.sep)
                is_pkg = rel[-1] == "__init__"
                parts = pkg.split(".") + (rel[:-1] if is_pkg else rel)
                mods[".".join(parts)] = (path, is_pkg)
    return mods


def _is_type_checking(test) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree, name, is_pkg):
    """Every dotted name `tree` imports, at any depth, relative ones resolved."""
    pkg = name if is_pkg else name.rpartition(".")[0]
    found = []

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for n in node.orelse:
                visit(n)
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            found.extend((base, f"{base}.{a.name}") for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root=ROOT, packages=PACKAGES):
    """{module: set of the modules (of these packages) it imports}."""
    mods = _modules(root, packages)

    def resolve(dotted):
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted

    graph = {}
    for name, (path, is_pkg) in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for item in _imported_names(tree, name, is_pkg):
            if isinstance(item, tuple):  # from base import x: the submodule base.x if there is one
                base, sub = item
                target = sub if sub in mods else resolve(base)
            else:
                target = resolve(item)
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan,
    iterative), each sorted; a module importing itself is not counted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "resfuse.ops.conv_bn_act" in graph and "resfuse.kernels.conv_bn_act" in graph
    found = cycles(graph)
    assert not found, "import cycles (each a set of modules that import each other):\n" + \
        "\n".join(" <-> ".join(c) for c in found)


def test_the_detector_sees_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")       # inside a function
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n")
    (pkg / "d.py").write_text("import pkg.c\n")                                              # exempt: TYPE_CHECKING
    graph = import_graph(str(tmp_path), {"pkg": "pkg"})
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.c"] == set() and graph["pkg.d"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_nn_holds_modules_and_imports_no_recognition():
    """The dependency runs one way: resfuse.recognize -> resfuse.nn. The
    modules' from_module constructors get their proofs through
    nn/_provers.py, where recognition registers them."""
    graph = import_graph()
    bad = {m: sorted(t for t in deps if t.startswith("resfuse.recognize") or t == "resfuse.convert")
           for m, deps in graph.items() if m == "resfuse.nn" or m.startswith("resfuse.nn.")}
    assert not any(bad.values()), {m: v for m, v in bad.items() if v}
    assert any(t.startswith("resfuse.nn") for t in graph["resfuse.recognize.blocks"])
