"""The modules of llama/data import one way: the graph of their imports of each other (module level and inside
functions, read from the source with ast) has no cycle. Before issue 15, tokenizer.py imported prepare.py inside
a function while prepare.py imported tokenizer.py."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "llama", "data")


def import_graph():
    mods = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for m in mods:
        with open(os.path.join(PKG, m + ".py")) as fh:
            tree = ast.parse(fh.read())
        deps = set()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                if n.startswith("llama.data.") and n.split(".")[2] in mods and n.split(".")[2] != m:
                    deps.add(n.split(".")[2])
        graph[m] = deps
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return None
    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_llama_data_has_no_import_cycle():
    graph = import_graph()
    assert "reading" in graph["tokenizer"] and "tokenizer" in graph["prepare"]     # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
