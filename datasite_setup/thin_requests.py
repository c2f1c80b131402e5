"""Recognise a "thin" code request: one that only names a site task and passes its inputs.

The admin approves the site's own, installed task code, not arbitrary code. A thin request is
exactly this shape (any function name; decorators are syft's and are ignored)::

    def anything(cases, params):
        return site_task("local_train", cases, params)

Everything else is custom code, which a site refuses unless its config sets
`allow_custom_code = true` (and even then it runs isolated under the strict scalars contract).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

CALL_NAME = "site_task"
ARGUMENTS = ("cases", "params")


@dataclass(frozen=True)
class ThinRequest:
    function: str
    task: str


def _function_def(source: str) -> ast.FunctionDef | None:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    if len(tree.body) != 1 or len(functions) != 1:
        return None
    return functions[0]


def parse_thin_request(source: str) -> ThinRequest | None:
    """The task a thin request names, or None if the source is anything else."""
    func = _function_def(source)
    if func is None:
        return None
    args = func.args
    if args.posonlyargs or args.vararg or args.kwarg or args.kwonlyargs or args.defaults:
        return None
    if tuple(a.arg for a in args.args) != ARGUMENTS:
        return None
    body = [node for node in func.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    if len(body) != 1 or not isinstance(body[0], ast.Return):
        return None
    call = body[0].value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == CALL_NAME):
        return None
    if call.keywords or len(call.args) != 3:
        return None
    task, *names = call.args
    if not (isinstance(task, ast.Constant) and isinstance(task.value, str)):
        return None
    if [n.id if isinstance(n, ast.Name) else None for n in names] != list(ARGUMENTS):
        return None
    return ThinRequest(function=func.name, task=task.value)
