"""A static read of submitted code, to point the admin at what deserves a second look.

It cannot prove code safe (the site's isolation and output checks do the enforcing); it flags the
patterns a reviewer should never miss: imports outside an allow-list, file, network and process
access, dynamic execution, reflection that reaches into the server, and returning whole images.
"""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass

ALLOWED_IMPORTS = frozenset(
    {
        "math", "statistics", "collections", "itertools", "functools", "typing", "dataclasses",
        "numpy", "scipy", "torch", "radiomics", "SimpleITK", "skimage", "pandas",
        "domains", "analyses",
    }
)

_DANGEROUS_CALLS = {
    "open": "file access",
    "eval": "dynamic code execution",
    "exec": "dynamic code execution",
    "compile": "dynamic code execution",
    "__import__": "dynamic import",
    "getattr": "reflection (can reach private attributes)",
    "setattr": "reflection (can change objects it was given)",
    "globals": "reflection (reads the executing module)",
    "locals": "reflection",
    "vars": "reflection",
    "breakpoint": "debugger",
}

_DANGEROUS_MODULES = {
    "os": "operating system access (files, environment, processes)",
    "sys": "interpreter internals",
    "subprocess": "starting processes",
    "socket": "network access",
    "requests": "network access",
    "urllib": "network access",
    "http": "network access",
    "shutil": "file access",
    "pathlib": "file access",
    "pickle": "arbitrary object loading",
    "ctypes": "native memory access",
    "importlib": "dynamic import",
    "inspect": "reflection",
    "gc": "reflection (can find any live object)",
    "syft": "the server's own objects",
}

_IMAGE_SIZED_ATTRS = {"image", "mask", "pixel_array", "images", "masks"}


@dataclass(frozen=True)
class Finding:
    line: int
    severity: str  # "high" = never approve without a reason; "warn" = read it
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def _root_module(name: str) -> str:
    return name.split(".")[0]


def _returns_image_data(node: ast.Return) -> bool:
    for sub in ast.walk(node) if node.value is not None else ():
        if isinstance(sub, ast.Subscript) and isinstance(sub.slice, ast.Constant) and sub.slice.value in _IMAGE_SIZED_ATTRS:
            return True
        if isinstance(sub, ast.Attribute) and sub.attr in _IMAGE_SIZED_ATTRS:
            return True
    return False


def audit_source(source: str) -> list[Finding]:
    """Findings for the submitted source, in line order; a syntax error is itself a finding."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return [Finding(exc.lineno or 0, "high", f"does not parse: {exc.msg}")]
    findings: list[Finding] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                root = _root_module(name)
                if root in _DANGEROUS_MODULES:
                    findings.append(Finding(node.lineno, "high", f"imports {name}: {_DANGEROUS_MODULES[root]}"))
                elif root not in ALLOWED_IMPORTS:
                    findings.append(Finding(node.lineno, "warn", f"imports {name}, which is not on the allow-list"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _DANGEROUS_CALLS:
            findings.append(Finding(node.lineno, "high", f"calls {node.func.id}(): {_DANGEROUS_CALLS[node.func.id]}"))
        elif isinstance(node, ast.Attribute) and node.attr.startswith("__") and node.attr.endswith("__"):
            findings.append(Finding(node.lineno, "high", f"uses dunder attribute {node.attr}: reflection into objects"))
        elif isinstance(node, ast.Return) and _returns_image_data(node):
            findings.append(Finding(node.lineno, "high", "returns image or mask data (only weights/aggregates may leave)"))
    return sorted(findings, key=lambda f: (f.line, f.message))
