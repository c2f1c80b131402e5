"""A static read of submitted code, to point the admin at what deserves a second look.

It cannot prove code safe (the site's isolation and output checks do the enforcing); it flags the
patterns a reviewer should never miss: imports outside an allow-list, file, network and process
access, dynamic execution, reflection that reaches into the server, returning whole images, and,
following each returned value back to the private inputs (`return_flow`), values that leave
without an aggregation, through an encoding, or under a name the site cannot read.
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from dataclasses import asdict, dataclass

from datasite_setup.output_contracts import MAX_NAME_LENGTH, is_scalar_name
from datasite_setup.return_flow import ReturnedValue, describe_steps, read_returns

ALLOWED_IMPORTS = frozenset(
    {
        "math", "statistics", "collections", "itertools", "functools", "typing", "dataclasses",
        "numpy", "scipy", "torch", "radiomics", "SimpleITK", "skimage", "pandas",
        "domains",
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


@dataclass(frozen=True)
class Finding:
    line: int
    severity: str  # "high" = never approve without a reason; "warn" = read it
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def _root_module(name: str) -> str:
    return name.split(".")[0]


def _returned_value_findings(value: ReturnedValue) -> list[Finding]:
    line, flow = value.line, value.flow
    findings = []
    if not value.in_dict_literal:
        what = "a value"
        findings.append(Finding(line, "high", "returns something other than a dict literal: the site releases only "
                                "values under literal names it can read here (return {\"name\": value, ...})"))
    elif value.name is None:
        what = "an entry with a computed name"
        findings.append(Finding(line, "high", "returns an entry whose name is not a string literal: the site "
                                "releases only the literal names it can read here"))
    else:
        what = f"{value.name[:40]!r}"
        if not is_scalar_name(value.name):
            findings.append(Finding(line, "high", f"returns {what}: a name must be an identifier of at most "
                                    f"{MAX_NAME_LENGTH} characters (letters, digits, _ . -)"))
    if flow.raw:
        steps = describe_steps(flow.selections | flow.encodings)
        findings.append(Finding(line, "high", f"returns {what} derived from the private input without an aggregation: "
                                "image or mask data or per-case values (only statistics may leave)"
                                + (f"; through {steps}" if steps else "")))
    elif flow.encodings:
        findings.append(Finding(line, "high", f"returns {what} built from the private input through "
                                f"{describe_steps(flow.encodings)}: an encoding of the data, not a statistic"))
    elif flow.selections:
        findings.append(Finding(line, "warn", f"returns {what} computed from a selection of the private input "
                                f"({describe_steps(flow.selections)}): a statistic of one case or region"))
    return findings


def audit_source(source: str, private_inputs: Collection[str] | None = None) -> list[Finding]:
    """Findings for the submitted source, in line order; a syntax error is itself a finding.
    `private_inputs` names the arguments that receive private data (default: every argument)."""
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
    reading = read_returns(source, private_inputs)
    if reading is None:
        findings.append(Finding(1, "high", "holds no function to read: the site cannot tell what it returns"))
    else:
        for value in reading.values:
            findings.extend(_returned_value_findings(value))
    return sorted(set(findings), key=lambda f: (f.line, f.message))
