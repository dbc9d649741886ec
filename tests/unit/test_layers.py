"""The layering rule of STYLE.md ("one direction of flow"), read from the source: a module imports
only from its own layer or the layers before it, the package has no import cycle, and a cogtune
import inside a function is there for start-up time, never to dodge a cycle."""

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "cogtune"

# In pipeline order; a module belongs to the first layer with a prefix of its name.
LAYERS = [
    ("basics", ["cogtune.errors", "cogtune.util"]),
    ("data", ["cogtune.data."]),
    ("settings and contract", ["cogtune.config", "cogtune.families", "cogtune.data_schema", "cogtune.quantize"]),
    ("cache", ["cogtune.cache"]),
    ("preprocess", ["cogtune.preprocess"]),
    ("train", ["cogtune.train"]),
    ("infer, export and merge", ["cogtune.infer", "cogtune.infer_memory", "cogtune.export", "cogtune.merge"]),
    ("commands and tools", ["cogtune.cli", "cogtune.__main__", "cogtune.templates", "cogtune.dev"]),
]
# Imports inside functions that keep a light command light; none exists to dodge a cycle.
LAZY_ALLOWED = {
    "cogtune.cli": "each command imports only its own stage, so `cogtune --help` starts without torch",
    "cogtune.config": "checking --buckets and validation files needs data, which imports torch, PyAV and pyarrow: "
                      "`cogtune <stage> --help` stays light",
    "cogtune.templates": "`cogtune init` writes text files without torch; only --tiny builds a tiny model",
}


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        names[name.removesuffix(".__init__")] = path
    return names


def imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported cogtune module, line, inside a function) for every import in a file; `from a import b`
    counts as importing a.b when that is a module."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cogtune"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.append((name if name in known else node.module, node.lineno, id(node) not in top_level))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) not in top_level) for alias in node.names
                      if alias.name.startswith("cogtune")]
    return found


def layer_of(module: str) -> int | None:
    for number, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix.rstrip(".") or module.startswith(prefix.rstrip(".") + ".") for prefix in prefixes):
            return number
    return None


def layering_problems(root: Path = PACKAGE) -> list[str]:
    names = module_names(root)
    problems, graph = [], {}
    for module, path in names.items():
        if module == "cogtune":
            continue
        mine = layer_of(module)
        if mine is None:
            problems.append(f"{module} belongs to no layer: add it to LAYERS in tests/test_layers.py")
            continue
        graph[module] = set()
        for target, line, lazy in imports(path, set(names)):
            where = f"{path.relative_to(root.parent)}:{line}"
            theirs = layer_of(target)
            if target != "cogtune" and theirs is not None and theirs > mine:
                problems.append(f"{where}: {module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]}), "
                                "a later layer")
            if lazy and not any(module == name or module.startswith(name + ".") for name in LAZY_ALLOWED):
                problems.append(f"{where}: {module} imports {target} inside a function; import it at the top")
            if target in names and target != module:
                graph[module].add(target)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (a package counts as importing only what
    its __init__ imports)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_imports_only_from_earlier_layers_without_cycles():
    assert layering_problems() == []


def copy_of_package(tmp_path: Path) -> Path:
    root = tmp_path / "cogtune"
    for path in PACKAGE.rglob("*.py"):
        target = root / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    return root


@pytest.mark.parametrize("planted, expected", [
    ("from cogtune.train.lora import LORA_WEIGHT_NAME\n",
     "cogtune/data_schema/layout.py:1: cogtune.data_schema.layout (settings and contract) imports cogtune.train.lora (train)"),
    ("def later():\n    from cogtune.cache import reader\n",
     "cogtune/data_schema/layout.py:2: cogtune.data_schema.layout imports cogtune.cache.reader inside a function"),
])
def test_a_planted_backwards_import_is_named(tmp_path, planted, expected):
    root = copy_of_package(tmp_path)
    contract = root / "data_schema" / "layout.py"
    contract.write_text(planted + contract.read_text())
    problems = layering_problems(root)
    assert any(problem.startswith(expected) for problem in problems), problems


def test_a_planted_cycle_is_named(tmp_path):
    root = copy_of_package(tmp_path)
    errors = root / "errors.py"
    errors.write_text("from cogtune.util import files\n" + errors.read_text())  # util.files imports errors
    assert "import cycle: cogtune.errors -> cogtune.util.files -> cogtune.errors" in layering_problems(root)


# --- STYLE.md: "no model class named outside families/" -----------------------------------------

MODEL_CLASS_HOMES = ("cogtune.families", "cogtune.dev")  # the family files, and the tiny-model builder


def model_class_kinds():
    """The base classes of what counts as a model class: diffusers models, pipelines and schedulers,
    transformers models and tokenizers."""
    from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    return DiffusionPipeline, ModelMixin, SchedulerMixin, PreTrainedModel, PreTrainedTokenizerBase


@functools.lru_cache(maxsize=None)
def is_model_class(name: str) -> bool:
    import diffusers
    import transformers

    kinds = model_class_kinds()
    for library in (diffusers, transformers):
        try:
            found = getattr(library, name)
        except (AttributeError, ImportError, RuntimeError):
            continue
        if isinstance(found, type) and issubclass(found, kinds):
            return True
    return False


def model_classes_named(root: Path = PACKAGE) -> list[str]:
    """Every place outside MODEL_CLASS_HOMES where source code names a diffusers or transformers model,
    pipeline, scheduler or tokenizer class: imported, reached as an attribute of the library, or
    spelled in a string (a class looked up by name)."""
    found = []
    for module, path in module_names(root).items():
        if module.startswith(MODEL_CLASS_HOMES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("diffusers", "transformers"):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in ("diffusers", "transformers"):
                names = [node.attr]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier() \
                    and node.value[:1].isupper():  # class names are CamelCase
                names = [node.value]
            found += [f"{path.relative_to(root.parent)}:{node.lineno}: {name}" for name in names if is_model_class(name)]
    return found


def test_no_model_pipeline_or_scheduler_class_is_named_outside_the_families():
    assert model_classes_named() == []


def test_a_planted_model_class_is_named(tmp_path):
    root = copy_of_package(tmp_path)
    step = root / "train" / "step.py"
    step.write_text(step.read_text() + "\n\ndef scheduler():\n    from diffusers import CogVideoXDDIMScheduler\n"
                    "    return CogVideoXDDIMScheduler, getattr(__import__('diffusers'), 'WanPipeline')\n")
    named = model_classes_named(root)
    assert [entry.split(": ")[1] for entry in named] == ["CogVideoXDDIMScheduler", "WanPipeline"], named
