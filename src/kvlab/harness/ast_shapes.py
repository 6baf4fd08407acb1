"""Small questions about AST nodes that the region validator (kvlab.harness.validate) asks: what an
assignment target stores into, whether an expression is constant data or names a module, how to print a
statement in a violation message."""

from __future__ import annotations

import ast
import re

# The modules a region may use, by the names it sees them as (`torch.X`, `nn.X`, `F.X`, `math.X`)
REGION_MODULES = {"torch": "torch", "nn": "torch.nn", "F": "torch.nn.functional", "math": "math"}
_DUNDER = re.compile(r"^__\w+__$")


def _unpack(target: ast.AST):
    """The single targets of an assignment target: a, (a, b), [a, *b]."""
    if isinstance(target, (ast.Tuple, ast.List)):
        for elt in target.elts:
            yield from _unpack(elt)
    elif isinstance(target, ast.Starred):
        yield from _unpack(target.value)
    else:
        yield target


def _store_root(node: ast.AST) -> ast.Name | None:
    """The name an attribute/subscript target hangs from (F in F.x[0].y), or None for a plain name."""
    if not isinstance(node, (ast.Attribute, ast.Subscript)):
        return None
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node if isinstance(node, ast.Name) else None


def _dotted(node: ast.AST) -> str:
    try:
        return ast.unparse(node)
    except Exception:  # pragma: no cover - unparse handles every expression the parser produced
        return type(node).__name__


def _names_a_module(node: ast.Attribute) -> bool:
    """Whether a chain such as torch.nn.functional, rooted at a region module, resolves to a module."""
    import importlib
    import types

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not (isinstance(node, ast.Name) and node.id in REGION_MODULES):
        return False
    obj = importlib.import_module(REGION_MODULES[node.id])
    for attr in reversed(parts):
        if _DUNDER.match(attr):
            return False  # flagged as a dunder already
        try:
            obj = getattr(obj, attr)
        except Exception:  # a name torch does not have: the file fails when it runs, not here
            return False
    return isinstance(obj, types.ModuleType)


def _is_constant_data(node: ast.AST) -> bool:
    """A literal made of constants only: 3, -1.0, "x", None, (1, 2), [], {}, {"a": 1}."""
    if _is_literal(node):
        return True
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(_is_constant_data(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _is_constant_data(k) for k in node.keys) and all(
            _is_constant_data(v) for v in node.values
        )
    return False


def _is_definition_only(stmt: ast.stmt, first: bool) -> bool:
    """Class-body statements that define without running code: def, pass, a docstring, NAME = literal."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Pass)):
        return True
    value = getattr(stmt, "value", None)
    if isinstance(stmt, ast.Expr) and isinstance(value, ast.Constant) and isinstance(value.value, str):
        return first  # the docstring (a string statement elsewhere is refused: it is no docstring)
    if isinstance(stmt, ast.Assign):
        return all(isinstance(t, ast.Name) for t in stmt.targets) and _is_constant_data(stmt.value)
    return False


def _describe(stmt: ast.stmt) -> str:
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        return f"a call, {_dotted(stmt.value.func)}(...)"
    if isinstance(stmt, ast.Assign):
        if not all(isinstance(t, ast.Name) for t in stmt.targets):
            return f"an assignment to {', '.join(_dotted(t) for t in stmt.targets)}"
        return f"{_dotted(stmt.targets[0])} = {_dotted(stmt.value)}, not a literal"
    return f"{type(stmt).__name__} statement"


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
