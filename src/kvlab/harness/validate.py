"""The AST boundary of an attention file's region (`kvlab validate FILE`).

Seed 000 accepts only function and class definitions at the top level of the region. kvlab adds the rules
that keep the region's code inside the attention block: no imports, no builtins that reach the
interpreter or the file system, no system-module names, no dunder attributes, no frame/code attributes,
no dynamic attribute names, no decorators, default arguments or class-body statements that run code when
the region is defined, and no monkeypatching: nothing assigned to or deleted from torch, nn, F or math (or
their submodules), which the region may only use as `torch.X`, never pass around. It is a boundary that
stops honest mistakes and casual escapes, not a sandbox: containment of what the code does when it runs
is `kvlab.harness.contain`'s job.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from kvlab.harness.ast_shapes import (
    _DUNDER,
    REGION_MODULES,
    _describe,
    _dotted,
    _is_definition_only,
    _is_dotted_name,
    _is_literal,
    _is_super_init,
    _names_a_module,
    _store_root,
    _unpack,
)
from kvlab.harness.template import REQUIRED_CLASS, REQUIRED_FUNCTIONS, Region, RegionMarkerError, read_region

FORBIDDEN_CALLS = {
    "exec",
    "eval",
    "compile",
    "__import__",
    "open",
    "globals",
    "locals",
    "vars",
    "input",
    "breakpoint",
    "help",
    "exit",
    "quit",
    "memoryview",
}
# module names (as a bare name or an attribute anywhere in a chain: torch.serialization.os)
FORBIDDEN_NAMES = {
    "os",
    "sys",
    "subprocess",
    "socket",
    "builtins",
    "ctypes",
    "shutil",
    "pathlib",
    "io",
    "importlib",
    "pickle",
    "marshal",
    "multiprocessing",
    "threading",
    "signal",
    "pty",
    "tempfile",
    "glob",
    "inspect",
    "gc",
    "code",
    "codeop",
    "runpy",
    "urllib",
    "http",
    "requests",
    "posix",
    "nt",
    "_posixsubprocess",
    "mmap",
    "resource",
    "fcntl",
    "select",
    "asyncio",
    "atexit",
    "weakref",
    "traceback",
    "linecache",
}
# attributes that lead from an object to frames, code or interpreter state without a dunder
FORBIDDEN_ATTRIBUTES = {
    "f_globals",
    "f_locals",
    "f_builtins",
    "f_back",
    "f_code",
    "gi_frame",
    "gi_code",
    "cr_frame",
    "cr_code",
    "ag_frame",
    "ag_code",
    "tb_frame",
    "tb_next",
    "co_code",
    "func_globals",
    "mro",
}
DYNAMIC_ATTRIBUTE_CALLS = {"getattr", "setattr", "delattr", "hasattr"}
# the modules the loader hands the region (loader.load_attention's namespace): used only as `torch.X`
ALLOWED_DECORATORS = {"staticmethod", "classmethod", "property"}
_DUNDER_IN_TEXT = re.compile(r"__\w+__")


@dataclass(frozen=True)
class Violation:
    line: int
    col: int
    rule: str
    message: str

    def format(self, path: str | Path) -> str:
        return f"{path}:{self.line}:{self.col} {self.rule}: {self.message}"


class _Checker(ast.NodeVisitor):
    def __init__(self, offset: int, tree: ast.AST | None = None):
        self.offset = offset  # file line of the region's line 1, minus 1
        self.found: list[Violation] = []
        # nodes that are the `.value` of an attribute access: `torch` in torch.zeros, torch.nn in torch.nn.X
        nodes = ast.walk(tree) if tree is not None else ()
        self.attribute_bases = {id(n.value) for n in nodes if isinstance(n, ast.Attribute)}

    def flag(self, node: ast.AST, rule: str, message: str) -> None:
        line = getattr(node, "lineno", 1) + self.offset
        self.found.append(Violation(line, getattr(node, "col_offset", 0) + 1, rule, message))

    # ---- statements that reach outside ----
    def visit_Import(self, node):
        self.flag(node, "import", "imports are not allowed in the region; use torch, nn, F and math")
        self.generic_visit(node)

    visit_ImportFrom = visit_Import

    def visit_Global(self, node):
        self.flag(node, "global", "global/nonlocal statements are not allowed in the region")

    visit_Nonlocal = visit_Global

    def visit_Name(self, node):
        if node.id in FORBIDDEN_CALLS:
            self.flag(node, "forbidden-builtin", f"{node.id!r} is not allowed in the region")
        elif node.id in FORBIDDEN_NAMES:
            self.flag(node, "forbidden-name", f"the name {node.id!r} reaches outside the attention block")
        elif _DUNDER.match(node.id):
            self.flag(node, "dunder-name", f"the name {node.id!r} is not allowed in the region")
        elif node.id in REGION_MODULES and id(node) not in self.attribute_bases:
            self.flag(node, "module-alias", _ALIAS_MESSAGE.format(node.id))

    def visit_Attribute(self, node):
        if _DUNDER.match(node.attr) and not _is_super_init(node):
            self.flag(node, "dunder-attribute", f"attribute access .{node.attr} is not allowed")
        elif node.attr in FORBIDDEN_NAMES:
            self.flag(node, "forbidden-name", f"attribute .{node.attr} reaches outside the attention block")
        elif node.attr in FORBIDDEN_ATTRIBUTES:
            self.flag(node, "frame-attribute", f"attribute .{node.attr} reaches interpreter internals")
        elif id(node) not in self.attribute_bases and _names_a_module(node):  # torch.nn.functional as a value
            self.flag(node, "module-alias", _ALIAS_MESSAGE.format(_dotted(node)))
        self.generic_visit(node)

    # ---- monkeypatching: writes into the modules every other part of kvlab (and torch) shares ----
    def _check_stores(self, targets) -> None:
        for target in targets:
            for t in _unpack(target):
                root = _store_root(t)
                if root is not None and root.id in REGION_MODULES:
                    self.flag(
                        t,
                        "monkeypatch",
                        f"assigning to or deleting {_dotted(t)} changes {root.id} for every model in the "
                        "process; keep state on self or in the cache",
                    )

    def visit_Assign(self, node):
        self._check_stores(node.targets)
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self._check_stores([node.target])
        self.generic_visit(node)

    def visit_Delete(self, node):
        self._check_stores(node.targets)
        self.generic_visit(node)

    def visit_For(self, node):
        self._check_stores([node.target])
        self.generic_visit(node)

    visit_AsyncFor = visit_For

    def visit_With(self, node):
        self._check_stores([item.optional_vars for item in node.items if item.optional_vars is not None])
        self.generic_visit(node)

    visit_AsyncWith = visit_With

    def visit_comprehension(self, node):
        self._check_stores([node.target])
        self.generic_visit(node)

    def visit_Call(self, node):
        func = node.func
        if isinstance(func, ast.Name) and func.id in DYNAMIC_ATTRIBUTE_CALLS:
            name = node.args[1] if len(node.args) > 1 else None
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                self.flag(node, "dynamic-attribute", f"{func.id}() needs a literal attribute name")
            elif _DUNDER_IN_TEXT.search(name.value):
                self.flag(node, "dunder-attribute", f"{func.id}(..., {name.value!r}) is not allowed")
            obj = node.args[0] if node.args and func.id in ("setattr", "delattr") else None
            obj = obj if isinstance(obj, ast.Name) or obj is None else _store_root(obj)
            if obj is not None and obj.id in REGION_MODULES:
                self.flag(
                    node, "monkeypatch", f"{func.id}() on {obj.id} changes it for every model in the process"
                )
        if isinstance(func, ast.Attribute) and func.attr in ("format", "format_map"):
            if isinstance(func.value, ast.Constant) and _DUNDER_IN_TEXT.search(str(func.value.value)):
                self.flag(node, "dunder-attribute", "format strings may not name dunder attributes")
        self.generic_visit(node)

    # ---- definition-time code ----
    def _check_definition(self, node) -> None:
        for dec in getattr(node, "decorator_list", []):
            if not (isinstance(dec, ast.Name) and dec.id in ALLOWED_DECORATORS):
                self.flag(
                    dec,
                    "decorator",
                    "decorators run code at definition time; only "
                    f"{', '.join(sorted(ALLOWED_DECORATORS))} are allowed",
                )
        args = node.args
        for default in [*args.defaults, *[d for d in args.kw_defaults if d is not None]]:
            if not _is_literal(default):
                self.flag(
                    default,
                    "default-argument",
                    "default arguments must be literals (they run at definition time)",
                )
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None and arg.annotation is not None:
                self.flag(arg.annotation, "annotation", "annotations run at definition time; remove them")
        if getattr(node, "returns", None) is not None:
            self.flag(node.returns, "annotation", "annotations run at definition time; remove them")

    def visit_FunctionDef(self, node):
        self._check_definition(node)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        self._check_definition(node)
        self.generic_visit(node)

    def visit_ClassDef(self, node):
        for dec in node.decorator_list:
            self.flag(dec, "decorator", "class decorators run code at definition time")
        for kw in node.keywords:
            self.flag(kw, "class-keyword", f"class keyword {kw.arg}= (e.g. a metaclass) is not allowed")
        for base in node.bases:
            if not _is_dotted_name(base):
                self.flag(base, "class-base", "class bases must be plain names such as nn.Module")
        for i, stmt in enumerate(node.body):
            if not _is_definition_only(stmt, first=i == 0):
                self.flag(
                    stmt,
                    "class-body-statement",
                    "a class body runs when the class is defined; only def, a docstring and NAME = literal "
                    f"may appear in it (found {_describe(stmt)})",
                )
        self.generic_visit(node)

    def visit_AnnAssign(self, node):
        self.flag(node, "annotation", "annotated assignments run their annotation; drop the annotation")
        self._check_stores([node.target])
        self.generic_visit(node)


_ALIAS_MESSAGE = "{0} may only be used as {0}.NAME: passing the module itself around reaches its attributes"


def validate_region(region: Region) -> list[Violation]:
    """Every violation of the boundary in the region, in file order (empty: the region is accepted)."""
    offset = region.first_line - 1
    try:
        tree = ast.parse(region.source, filename=str(region.path))
    except SyntaxError as e:
        return [Violation((e.lineno or 1) + offset, e.offset or 1, "syntax", e.msg)]
    checker = _Checker(offset, tree)
    defined: dict[str, ast.AST] = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            defined[stmt.name] = stmt
        else:
            checker.flag(
                stmt,
                "top-level-statement",
                f"only def and class may appear at the top level of the region (found {type(stmt).__name__})",
            )
    for name in REQUIRED_FUNCTIONS:
        if not isinstance(defined.get(name), ast.FunctionDef):
            checker.flag(tree, "missing-definition", f"the region must define function {name}")
    if not isinstance(defined.get(REQUIRED_CLASS), ast.ClassDef):
        checker.flag(tree, "missing-definition", f"the region must define class {REQUIRED_CLASS}")
    checker.visit(tree)
    return sorted(checker.found, key=lambda v: (v.line, v.col, v.rule))


def validate_file(path: str | Path) -> list[Violation]:
    """validate_region of the file's region; a file without markers gives one `region-markers` violation.

    A file that cannot be read as text (missing, binary, not UTF-8) is not a violation but a usage error:
    AttentionFileError (kvlab validate: one `kvlab: error:` line, exit 2)."""
    try:
        region = read_region(path)
    except RegionMarkerError as e:
        return [Violation(1, 1, "region-markers", str(e).split(": ", 1)[-1])]
    return validate_region(region)
