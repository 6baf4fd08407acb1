"""The AST boundary of an attention file's region (`kvlab validate FILE`).

Seed 000 accepts only function and class definitions at the top level of the region. kvlab adds the rules
that keep the region's code inside the attention block: no imports, no builtins that reach the
interpreter or the file system, no system-module names, no dunder attributes, no frame/code attributes,
no dynamic attribute names, and no decorators or default arguments that run code when the region is
defined. It is a boundary that stops honest mistakes and casual escapes, not a sandbox: containment of
what the code does when it runs is `kvlab.harness.contain`'s job.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from kvlab.harness.template import REQUIRED_CLASS, REQUIRED_FUNCTIONS, AttentionFileError, Region, read_region

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
ALLOWED_DECORATORS = {"staticmethod", "classmethod", "property"}
_DUNDER = re.compile(r"^__\w+__$")
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
    def __init__(self, offset: int):
        self.offset = offset  # file line of the region's line 1, minus 1
        self.found: list[Violation] = []

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

    def visit_Attribute(self, node):
        if _DUNDER.match(node.attr) and not _is_super_init(node):
            self.flag(node, "dunder-attribute", f"attribute access .{node.attr} is not allowed")
        elif node.attr in FORBIDDEN_NAMES:
            self.flag(node, "forbidden-name", f"attribute .{node.attr} reaches outside the attention block")
        elif node.attr in FORBIDDEN_ATTRIBUTES:
            self.flag(node, "frame-attribute", f"attribute .{node.attr} reaches interpreter internals")
        self.generic_visit(node)

    def visit_Call(self, node):
        func = node.func
        if isinstance(func, ast.Name) and func.id in DYNAMIC_ATTRIBUTE_CALLS:
            name = node.args[1] if len(node.args) > 1 else None
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                self.flag(node, "dynamic-attribute", f"{func.id}() needs a literal attribute name")
            elif _DUNDER_IN_TEXT.search(name.value):
                self.flag(node, "dunder-attribute", f"{func.id}(..., {name.value!r}) is not allowed")
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
        self.generic_visit(node)

    def visit_AnnAssign(self, node):
        self.flag(node, "annotation", "annotated assignments run their annotation; drop the annotation")
        self.generic_visit(node)


def _is_super_init(node: ast.Attribute) -> bool:
    """`super().__init__`: the one dunder every nn.Module subclass needs."""
    call = node.value
    return (
        node.attr == "__init__"
        and isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "super"
        and not call.args
    )


def _is_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return isinstance(node.operand, ast.Constant)
    if isinstance(node, ast.Tuple):
        return all(_is_literal(e) for e in node.elts)
    return False


def _is_dotted_name(node: ast.AST) -> bool:
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def validate_region(region: Region) -> list[Violation]:
    """Every violation of the boundary in the region, in file order (empty: the region is accepted)."""
    offset = region.first_line - 1
    try:
        tree = ast.parse(region.source, filename=str(region.path))
    except SyntaxError as e:
        return [Violation((e.lineno or 1) + offset, e.offset or 1, "syntax", e.msg)]
    checker = _Checker(offset)
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
    """validate_region of the file's region; a file without markers gives one `region-markers` violation."""
    try:
        region = read_region(path)
    except AttentionFileError as e:
        return [Violation(1, 1, "region-markers", str(e).split(": ", 1)[-1])]
    return validate_region(region)
