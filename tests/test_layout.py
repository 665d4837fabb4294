"""The pack's layering, read from the code's own imports (AST, nothing imported).

Imports flow one way: nodes -> turbo -> sampling -> parallel -> weights -> checkpoints -> model -> kernels, dwpose beside
them (imported by nodes only); the core never imports ComfyUI or the nodes. A package may import itself and
anything below it, never above; so there is no cycle between packages.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# highest first: a package may import only those after it in this list (and itself). Written as folders: the
# old flat modules model.py / sampling.py had the dotted names these packages have now.
LAYERS = [p.replace("/", ".") for p in ("nodes", "turbo", "steadydancer/sampling", "steadydancer/parallel",
                                        "steadydancer/weights",
                                        "steadydancer/checkpoints", "steadydancer/model", "steadydancer/kernels")]
BESIDE = {"dwpose": {"dwpose"}}  # may import only itself
COMFY = {"comfy", "folder_paths", "server", "nodes", "comfy_extras", "comfy_api"}
# nodes/ modules that may import ComfyUI: the bridge, and the two bridge-side modules that subclass ComfyUI's
# classes (the native MODEL; the GUIDER / SAMPLER pieces). Those two import it only lazily, inside functions, so
# the pack still imports without ComfyUI (checked below).
BRIDGE = "comfy_bridge.py"
BRIDGE_SIDE = {"native_model.py", "native_sampling.py"}


def _package_of(dotted):
    for p in LAYERS + list(BESIDE):
        if dotted == p or dotted.startswith(p + "."):
            return p
    return None


def _imports(path):
    """(line, dotted module from the pack root or None, top-level name for an outside import) per import."""
    rel = path.relative_to(ROOT).with_suffix("")
    pkg = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)]
                mod = ".".join(base + (node.module.split(".") if node.module else []))
                for a in node.names:  # ``from . import x`` imports the module x
                    full = f"{mod}.{a.name}" if mod else a.name
                    yield node.lineno, full if (ROOT / full.replace(".", "/")).with_suffix(".py").exists() \
                        or (ROOT / full.replace(".", "/")).is_dir() else mod, None
            elif node.module:
                if node.module.startswith("steadydancer_turbo."):
                    yield node.lineno, node.module[len("steadydancer_turbo."):], None
                else:
                    yield node.lineno, None, node.module.split(".")[0]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("steadydancer_turbo."):
                    yield node.lineno, a.name[len("steadydancer_turbo."):], None
                else:
                    yield node.lineno, None, a.name.split(".")[0]


def _module_level_lines(path):
    """Lines of the imports a module runs when it is imported (not inside a function or class)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = set()

    def visit(nodes):
        for n in nodes:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                lines.add(n.lineno)
            elif not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                visit(list(ast.iter_child_nodes(n)))
    visit(tree.body)
    return lines


def _core_files():
    for top in ("nodes", "turbo", "steadydancer", "dwpose"):
        yield from sorted((ROOT / top).rglob("*.py"))


def test_every_core_file_belongs_to_a_layer():
    stray = [str(p.relative_to(ROOT)) for p in _core_files()
             if _package_of(".".join(p.relative_to(ROOT).with_suffix("").parts)) is None
             and p.name != "__init__.py"]
    assert not stray, f"modules outside every package of the layering (place them in a subpackage): {stray}"


def test_imports_flow_one_way_and_the_core_never_imports_comfyui():
    wrong = []
    for path in _core_files():
        me = _package_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if me is None:
            continue
        allowed = BESIDE.get(me) or set(LAYERS[LAYERS.index(me):])
        if me == "nodes":
            allowed = allowed | {"dwpose"}
        for line, target, outside in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if outside is not None:
                if me != "nodes" and outside in COMFY:
                    wrong.append(f"{where} imports ComfyUI's {outside!r}")
                elif me == "nodes" and outside in COMFY and path.name != BRIDGE:
                    if path.name not in BRIDGE_SIDE:
                        wrong.append(f"{where} imports {outside!r} outside nodes/comfy_bridge.py (and the "
                                     f"bridge-side {sorted(BRIDGE_SIDE)})")
                    elif line in _module_level_lines(path):
                        wrong.append(f"{where}: bridge-side module imports {outside!r} at module level (import it "
                                     "inside a function, so the pack imports without ComfyUI)")
                continue
            other = _package_of(target)
            if other is None:
                if target not in ("", "steadydancer"):
                    wrong.append(f"{where} imports {target!r}, which is in no layer")
                continue
            if other not in allowed:
                wrong.append(f"{where}: {me} imports {target} (upward: {me} may import {sorted(allowed)})")
    assert not wrong, "\n".join(wrong)
