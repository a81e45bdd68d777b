"""The package's layers, enforced from the source (docs/ARCHITECTURE.md draws them):

  ops (kernels) -> models -> checkpoints / loaders / text / audio / video -> runtime (budget, plan,
  placement, streaming, kernels) -> pipeline -> multigpu (launch, workers) -> service / CLI -> nodes;
  errors, limits, dependencies, files sit under everything.

Every module of infinitetalk/ and nodes/ is parsed with ast; the graph holds module-level AND function-local
imports. No circle may exist in it: so a function-local import can never be one that only dodges a circle
(moved to the top it would close one, and the graph already counts it). Function-local imports are allowed
only for the reasons listed below.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("infinitetalk", "nodes")

# Third-party packages that may be imported inside a function, and why.
LOCAL_THIRD_PARTY = {
    "av": "PyAV (FFmpeg): heavy; nodes and probes open media only when they run",
    "gguf": "the gguf parser: needed only when a .gguf file is opened or written",
    "sentencepiece": "the T5 tokenizer: loaded only with the text encoder",
    "flash_attn": "optional attention kernel, imported only when asked for by name",
    "sageattention": "optional attention kernel, imported only when asked for by name",
    "psycopg": "optional job-store backend, only when configured",
    "boto3": "optional object-store backend, only when configured",
    "botocore": "boto3's own core (client config), with boto3 only when S3 outputs are configured",
    "aiohttp": "the job API's HTTP client/server: only where a URL is fetched",
    "PIL": "ComfyUI's image library, for node previews only",
    "torch": "nodes/CLI start (ComfyUI import, --help) without importing torch",
    "folder_paths": "ComfyUI-only module (absent outside ComfyUI)",
    "server": "ComfyUI-only module (absent outside ComfyUI)",
    "execution": "ComfyUI-only module (absent outside ComfyUI)",
    "comfy": "ComfyUI-only package (absent outside ComfyUI)",
    # An absolute `nodes` is ComfyUI's top-level module (interrupt_processing, ...): ComfyUI imports this pack
    # as custom_nodes.<folder>, so our nodes/ package is only ever reached relatively (see __init__.py).
    "nodes": "ComfyUI's top-level nodes module (absent outside ComfyUI); ours is imported relatively only",
}
# Our modules that may import our own modules inside functions, and why. The acyclicity test proves none of
# these imports dodges a circle.
LOCAL_OURS = {
    "infinitetalk.cli": "each sub-command imports only what it needs (fast --help, `plan` without the pipeline)",
    "infinitetalk.demo": "the demo pulls the pipeline only when run",
    "infinitetalk.parity.": "each golden kind imports only what it checks",
    "infinitetalk.tiny.": "tiny test checkpoints build only the component asked for",
    "infinitetalk.service.": "the job API imports (and answers 503) without the media/model dependencies",
    "nodes.": "ComfyUI imports node packs at start: nothing heavy before a node runs",
}

BOTTOM = ("infinitetalk", "infinitetalk.errors", "infinitetalk.limits", "infinitetalk.dependencies",
          "infinitetalk.files")
RUNTIME = "infinitetalk.runtime"           # placement and kernels, below the pipeline
ORCHESTRATION = "infinitetalk.multigpu"    # several processes, one job: above the pipeline
FRONTS = ("infinitetalk.service", "infinitetalk.cli", "infinitetalk.demo", "infinitetalk.parity", "nodes")


def _modules(root: Path = ROOT) -> dict[str, tuple[Path, str]]:
    """module name -> (file, the package relative imports start from)."""
    out = {}
    for base in OURS:
        for path in (root / base).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
                out[".".join(parts)] = (path, ".".join(parts))
            else:
                out[".".join(parts)] = (path, ".".join(parts[:-1]))
    return out


COMFYUI_NODES = "<comfyui>.nodes"   # an absolute `nodes` import: ComfyUI's module, never our package


def _absolute(name: str) -> str:
    """An absolutely imported name; `nodes...` is ComfyUI's top-level module (ours is reached relatively)."""
    return COMFYUI_NODES + name[len("nodes"):] if name.split(".")[0] == "nodes" else name


def _ours(name: str) -> bool:
    return name.split(".")[0] in OURS


def _owner(name: str, mods: dict) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(tree: ast.AST, package: str, mods: dict):
    """(imported name, local: bool, line) for every import; names of our modules resolved to the module."""
    def walk(node: ast.AST, local: bool):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    yield _absolute(a.name), inner, child.lineno
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".") if package else []
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = _absolute(child.module or "")
                for a in child.names:
                    sub = f"{module}.{a.name}"
                    yield (sub if sub in mods else module), inner, child.lineno
            yield from walk(child, inner)

    yield from walk(tree, False)


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Edges between our modules (TYPE_CHECKING blocks included: they are real for readers), and every
    function-local import as (module, imported name, line)."""
    mods = _modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    local: list[tuple[str, str, int]] = []
    for name, (path, package) in mods.items():
        for target, is_local, line in _imports(ast.parse(path.read_text()), package, mods):
            owner = _owner(target, mods) if _ours(target) else None
            if owner and owner != name:
                edges[name].add(owner)
            if is_local:
                local.append((name, target, line))
    return edges, local


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(edges):
        if v not in state and (c := visit(v)):
            return c
    return None


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


EDGES, LOCAL = import_graph()


def test_the_checker_sees_a_circle():
    """The cycle finder reports a circle closed by a function-local edge (as a reintroduced one would be)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert "infinitetalk.pipeline.models" in EDGES and "infinitetalk.runtime.plan" in EDGES["infinitetalk.pipeline.models"]


def test_the_graph_counts_function_local_imports(tmp_path):
    """End to end on a tiny synthetic package: a circle closed only inside a function is found, and an
    absolute `import nodes` (ComfyUI's module) is not taken for our nodes/ package."""
    pkg = tmp_path / "infinitetalk"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    import nodes\n    return a, nodes\n")
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "__init__.py").write_text("")
    edges, local = import_graph(tmp_path)
    assert find_cycle(edges) in (["infinitetalk.a", "infinitetalk.b", "infinitetalk.a"],
                                 ["infinitetalk.b", "infinitetalk.a", "infinitetalk.b"])
    assert "nodes" not in edges["infinitetalk.b"]
    assert {(m, t) for m, t, _ in local} == {("infinitetalk.b", "infinitetalk.a"), ("infinitetalk.b", COMFYUI_NODES)}


def test_no_import_circles():
    assert find_cycle(EDGES) is None, " -> ".join(find_cycle(EDGES) or [])


def test_bottom_modules_import_only_errors():
    for m in BOTTOM:
        assert EDGES[m] <= {"infinitetalk.errors"}, (m, EDGES[m])


def test_ops_import_nothing_above():
    for m, targets in EDGES.items():
        if _under(m, "infinitetalk.ops"):
            bad = {t for t in targets if not _under(t, "infinitetalk.ops", "infinitetalk.errors")}
            assert not bad, (m, bad)


def test_models_import_only_ops():
    for m, targets in EDGES.items():
        if _under(m, "infinitetalk.models"):
            bad = {t for t in targets if not _under(t, "infinitetalk.models", "infinitetalk.ops", "infinitetalk.errors")}
            assert not bad, (m, bad)


def test_readers_and_loaders_stay_below_the_pipeline():
    above = ("infinitetalk.pipeline", RUNTIME, ORCHESTRATION, *FRONTS)
    for m, targets in EDGES.items():
        if _under(m, "infinitetalk.checkpoints", "infinitetalk.loaders", "infinitetalk.audio", "infinitetalk.video",
                  "infinitetalk.text"):
            bad = {t for t in targets if _under(t, *above)}
            assert not bad, (m, bad)


def test_runtime_never_imports_the_pipeline_or_anything_above():
    for m, targets in EDGES.items():
        if _under(m, RUNTIME):
            bad = {t for t in targets if _under(t, "infinitetalk.pipeline", ORCHESTRATION, *FRONTS)}
            assert not bad, (m, bad)


def test_pipeline_never_imports_orchestration_or_the_fronts():
    for m, targets in EDGES.items():
        if _under(m, "infinitetalk.pipeline"):
            bad = {t for t in targets if _under(t, ORCHESTRATION, *FRONTS)}
            assert not bad, (m, bad)


def test_orchestration_sits_above_the_pipeline_and_below_the_fronts():
    """multigpu/ drives the pipeline (it must reach it) and is driven by the CLI and the nodes."""
    assert any(_under(t, "infinitetalk.pipeline") for t in EDGES["infinitetalk.multigpu.workers"])
    for m, targets in EDGES.items():
        if _under(m, ORCHESTRATION):
            bad = {t for t in targets if _under(t, *FRONTS)}
            assert not bad, (m, bad)


def test_nothing_in_the_library_imports_the_nodes():
    for m, targets in EDGES.items():
        if _under(m, "infinitetalk"):
            assert not {t for t in targets if _under(t, "nodes")}, m


def test_function_local_imports_have_a_listed_reason():
    stdlib = set(sys.stdlib_module_names)
    for module, target, line in LOCAL:
        top = "nodes" if target.startswith(COMFYUI_NODES) else target.split(".")[0]
        where = f"{module}:{line} imports {target} inside a function"
        if _ours(target):
            assert any(module == p or (p.endswith(".") and module.startswith(p)) for p in LOCAL_OURS), \
                where + ": import it at module level (the graph is acyclic) or list the module in LOCAL_OURS"
        elif top not in stdlib:
            assert top in LOCAL_THIRD_PARTY, where + ": list the package in LOCAL_THIRD_PARTY with its reason"


# The service's front door: settings.py reads the environment (once, at start), app.py builds the parts.
SERVICE = ROOT / "infinitetalk" / "service"
SERVICE_ENV_READERS = {
    "settings.py": "every INFINITETALK_API* setting, read and checked once",
}
BUILT_BY_APP = ("JobStore", "JobService", "Worker", "WebhookSender", "S3Outputs", "S3Inputs", "JobApi")


def test_the_service_reads_the_environment_in_listed_places_only():
    readers = {p.name for p in SERVICE.glob("*.py") if "os.environ" in p.read_text() or "getenv" in p.read_text()}
    assert readers <= set(SERVICE_ENV_READERS), sorted(readers - set(SERVICE_ENV_READERS))


def test_only_the_front_door_builds_the_service_parts():
    for path in sorted(SERVICE.glob("*.py")):
        if path.name == "app.py":
            continue
        calls = {node.func.id for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert not calls & set(BUILT_BY_APP), f"{path.name} builds {sorted(calls & set(BUILT_BY_APP))}"
