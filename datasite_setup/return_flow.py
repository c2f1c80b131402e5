"""Where the values a custom function returns come from: its private inputs, and how.

The output contract lets a custom-code run carry only a few named finite floats; whether those
floats are statistics or the data itself depends on how they were computed. This follows every
value from the function's private arguments to its `return` statements and records, for each
returned entry, whether it is still *raw* (derived from the private input without passing
through an aggregation), which *selections* it went through (indexing, slicing, `.item()`: one
case, one pixel) and which *encodings* (bytes, struct packing, integer conversion of raw values,
bit operations, `tolist`), which carry data verbatim even inside a sum. It also reads the names
the function returns: the literal keys of the dict literals it returns, which the site's output
contract then enforces, so the names a reviewer sees are the only ones that can leave.

The reading is flow-insensitive (a name holds everything ever assigned to it) and follows
assignments, container mutation, loops, comprehensions, local helper functions and branches on
private values. It guides the reviewer; it proves nothing.
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from dataclasses import dataclass, field, replace

Step = tuple[int, str]  # (line, what happened there)

_AGGREGATIONS = frozenset({
    "sum", "nansum", "len", "min", "max", "amin", "amax", "nanmin", "nanmax", "mean", "nanmean", "average",
    "median", "nanmedian", "std", "nanstd", "var", "nanvar", "percentile", "nanpercentile", "quantile",
    "nanquantile", "count_nonzero", "histogram", "histogram_bin_edges", "bincount", "prod", "nanprod", "any",
    "all", "ptp", "corrcoef", "cov", "fsum", "fmean", "pstdev", "pvariance", "stdev", "variance", "norm",
    "trace", "argmax", "argmin", "mode",
})
_FULL_REDUCTIONS = frozenset({"sum", "len", "min", "max", "any", "all", "fsum", "fmean"})  # builtins, math
_ENCODINGS = frozenset({
    "tolist", "tobytes", "tostring", "to_bytes", "from_bytes", "frombuffer", "fromstring", "packbits",
    "unpackbits", "pack", "pack_into", "unpack", "unpack_from", "iter_unpack", "bytes", "bytearray",
    "memoryview", "hex", "bin", "oct", "ord", "chr", "b64encode", "encode",
})
_SELECTIONS = frozenset({"item", "take", "take_along_axis", "choose"})
_METADATA = frozenset({"shape", "size", "ndim", "dtype", "nbytes", "itemsize"})
_MUTATORS = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "appendleft", "extendleft"})
_BIT_OPS = {ast.LShift: "<<", ast.RShift: ">>", ast.BitOr: "|", ast.BitAnd: "&", ast.BitXor: "^"}
_ACCUMULATING = (ast.Add, ast.Sub, ast.Mult)


@dataclass(frozen=True)
class Flow:
    """What a value owes to the private inputs."""

    private: bool = False
    raw: bool = False  # private, and no aggregation since
    selections: frozenset[Step] = frozenset()
    encodings: frozenset[Step] = frozenset()

    def __or__(self, other: Flow) -> Flow:
        return Flow(
            self.private or other.private, self.raw or other.raw,
            self.selections | other.selections, self.encodings | other.encodings,
        )

    def aggregated(self) -> Flow:
        return replace(self, raw=False)

    def as_collection(self) -> Flow:
        """A container of private values holds them one by one: raw again."""
        return replace(self, raw=True) if self.private else self

    def selected(self, step: Step) -> Flow:
        return replace(self, selections=self.selections | {step}) if self.raw else self

    def encoded(self, step: Step) -> Flow:
        return replace(self, encodings=self.encodings | {step}) if self.private else self


CLEAN = Flow()
PRIVATE = Flow(private=True, raw=True)


@dataclass(frozen=True)
class ReturnedValue:
    """One returned dict entry (`name` is its literal key, None if the key is not a string
    literal), or a whole returned value that is not a dict literal (`in_dict_literal` False)."""

    line: int
    name: str | None
    flow: Flow
    in_dict_literal: bool = True


@dataclass(frozen=True)
class ReturnReading:
    values: tuple[ReturnedValue, ...] = ()

    @property
    def names(self) -> frozenset[str]:
        """The names the function declares by returning them as literal keys."""
        return frozenset(v.name for v in self.values if v.name is not None)

    @property
    def names_readable(self) -> bool:
        """True when every returned entry has a literal name (else its value can never be released)."""
        return all(v.name is not None for v in self.values)


def _dotted_tail(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


@dataclass
class _Tracer:
    local_functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef]
    env: dict[str, Flow] = field(default_factory=dict)
    returns: list[ReturnedValue] = field(default_factory=list)
    _summarising: frozenset[str] = frozenset()

    # statements

    def run(self, body: list[ast.stmt], passes: int = 12) -> None:
        """Walk `body` until no name's flow changes (assignments later in a loop feed earlier uses)."""
        for _ in range(passes):
            before = dict(self.env)
            self.returns = []
            self._block(body, CLEAN, False)
            if self.env == before:
                return

    def _block(self, body: list[ast.stmt], context: Flow, private_loop: bool) -> None:
        for stmt in body:
            self._statement(stmt, context, private_loop)

    def _statement(self, node: ast.stmt, context: Flow, private_loop: bool) -> None:
        if isinstance(node, ast.Assign):
            flow = self.expr(node.value) | context
            if private_loop:
                flow = flow.as_collection()  # holds one item's value after the loop: a per-item value
            for target in node.targets:
                self._bind(target, flow)
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            self._bind(node.target, self.expr(node.value) | context)
        elif isinstance(node, ast.AugAssign):
            flow = self.expr(node.value) | self.expr(node.target) | context
            if type(node.op) in _BIT_OPS:
                flow = flow.encoded((node.lineno, f"bit operation {_BIT_OPS[type(node.op)]}="))
            if isinstance(node.value, (ast.List, ast.Tuple, ast.ListComp)):
                flow = flow.as_collection()
            elif private_loop and isinstance(node.op, _ACCUMULATING):
                flow = flow.aggregated()  # a running total over the private items
            self._bind(node.target, flow)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            items = self.expr(node.iter)
            self._bind(node.target, items | context)
            self._block(node.body, context, private_loop or items.private)
            self._block(node.orelse, context, private_loop)
        elif isinstance(node, ast.While):
            self._block(node.body, context | self.expr(node.test), private_loop)
            self._block(node.orelse, context, private_loop)
        elif isinstance(node, ast.If):
            inner = context | self.expr(node.test)
            self._block(node.body, inner, private_loop)
            self._block(node.orelse, inner, private_loop)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                if item.optional_vars is not None:
                    self._bind(item.optional_vars, self.expr(item.context_expr) | context)
            self._block(node.body, context, private_loop)
        elif isinstance(node, ast.Try):
            self._block(node.body, context, private_loop)
            for handler in node.handlers:
                self._block(handler.body, context, private_loop)
            self._block(node.orelse, context, private_loop)
            self._block(node.finalbody, context, private_loop)
        elif isinstance(node, ast.Return):
            self._returned(node, context)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return  # read when called (functions) or not at all (classes hold no returned value)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expr(child)

    def _returned(self, node: ast.Return, context: Flow) -> None:
        value = node.value
        if value is None or (isinstance(value, ast.Constant) and value.value is None):
            return
        if not isinstance(value, ast.Dict):
            self.returns.append(ReturnedValue(node.lineno, None, self.expr(value) | context, in_dict_literal=False))
            return
        for key, item in zip(value.keys, value.values):
            name = key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else None
            flow = self.expr(item) | context | (self.expr(key) if key is not None else CLEAN)
            self.returns.append(ReturnedValue(getattr(item, "lineno", node.lineno), name, flow))

    def _bind(self, target: ast.expr, flow: Flow) -> None:
        if isinstance(target, ast.Name):
            self.env[target.id] = self.env.get(target.id, CLEAN) | flow
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self._bind(element, flow)
        elif isinstance(target, ast.Starred):
            self._bind(target.value, flow)
        elif isinstance(target, ast.Subscript):
            keyed = isinstance(target.slice, ast.Constant) and isinstance(target.slice.value, str)
            stored = flow | self.expr(target.slice)
            self._bind(target.value, stored if keyed else stored.as_collection())
        elif isinstance(target, ast.Attribute):
            self._bind(target.value, flow)

    # expressions

    def expr(self, node: ast.expr) -> Flow:
        if isinstance(node, ast.Name):
            return self.env.get(node.id, CLEAN)
        if isinstance(node, ast.Constant):
            return CLEAN
        if isinstance(node, ast.Attribute):
            base = self.expr(node.value)
            return base.aggregated() if node.attr in _METADATA else base
        if isinstance(node, ast.Subscript):
            base = self.expr(node.value)
            index = self.expr(node.slice)
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                return base | index
            if index.raw:
                return base | index  # a mask computed from the data: a region, not a chosen item
            kind = "slicing" if any(isinstance(n, ast.Slice) for n in ast.walk(node.slice)) else "indexing"
            return base.selected((node.lineno, kind)) | index
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.BinOp):
            flow = self.expr(node.left) | self.expr(node.right)
            if type(node.op) in _BIT_OPS:
                flow = flow.encoded((node.lineno, f"bit operation {_BIT_OPS[type(node.op)]}"))
            return flow
        if isinstance(node, ast.UnaryOp):
            flow = self.expr(node.operand)
            return flow.encoded((node.lineno, "bit operation ~")) if isinstance(node.op, ast.Invert) else flow
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            return self._join(node.elts).as_collection()
        if isinstance(node, ast.Dict):
            return self._join([k for k in node.keys if k is not None] + node.values).as_collection()
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            return self._comprehension(node)
        if isinstance(node, ast.NamedExpr):
            flow = self.expr(node.value)
            self._bind(node.target, flow)
            return flow
        if isinstance(node, ast.Lambda):
            return CLEAN
        return self._join([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)])

    def _join(self, nodes: list[ast.expr]) -> Flow:
        flow = CLEAN
        for node in nodes:
            flow = flow | self.expr(node)
        return flow

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> Flow:
        over_private = False
        filters = CLEAN
        for generator in node.generators:
            items = self.expr(generator.iter)
            over_private = over_private or items.private
            self._bind(generator.target, items)
            filters = filters | self._join(generator.ifs)
        elements = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        flow = self._join(elements) | filters
        return flow.as_collection() if over_private else flow

    def _call(self, node: ast.Call) -> Flow:
        func = node.func
        receiver = self.expr(func.value) if isinstance(func, ast.Attribute) else CLEAN
        args = self._join([a.value if isinstance(a, ast.Starred) else a for a in node.args] + [k.value for k in node.keywords])
        inputs = receiver | args
        name = _dotted_tail(func)
        step = (node.lineno, f"{name}()")
        if isinstance(func, ast.Name) and name in self.local_functions:
            return self._local_call(name, args) | receiver
        if isinstance(func, ast.Attribute) and name in _MUTATORS and isinstance(func.value, ast.Name):
            self._bind(func.value, args.as_collection())
            return receiver
        if name in _ENCODINGS:
            return inputs.encoded(step)
        if name == "int" or (name == "astype" and any("int" in ast.unparse(a) for a in node.args + [k.value for k in node.keywords])):
            return inputs.encoded((node.lineno, "conversion to integers")) if inputs.raw else inputs
        if name in _SELECTIONS:
            return inputs.selected(step)
        if name in _AGGREGATIONS and inputs.private:
            partial = any(k.arg in ("axis", "dim", "axes") for k in node.keywords) or (
                name not in _FULL_REDUCTIONS and len(node.args) > (0 if isinstance(func, ast.Attribute) and receiver.private else 1)
            )
            return inputs if partial else inputs.aggregated()
        return inputs

    def _local_call(self, name: str, args: Flow) -> Flow:
        """A helper defined in the function: what its return owes to its arguments (and to the
        private names it reads from the enclosing function)."""
        if name in self._summarising:
            return args
        helper = self.local_functions[name]
        inner = _Tracer(self.local_functions, dict(self.env), _summarising=self._summarising | {name})
        params = [a.arg for a in helper.args.posonlyargs + helper.args.args + helper.args.kwonlyargs]
        params += [a.arg for a in (helper.args.vararg, helper.args.kwarg) if a is not None]
        for param in params:
            inner.env[param] = PRIVATE if args.private else CLEAN
        inner.run(helper.body)
        result = CLEAN
        for returned in inner.returns:
            result = result | returned.flow
        if not args.private:
            return result
        return Flow(True, result.raw, args.selections | result.selections, args.encodings | result.encodings)


def _entry_function(tree: ast.Module) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """syft runs the first statement of the submitted code as the function."""
    first = tree.body[0] if tree.body else None
    return first if isinstance(first, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def read_returns(source: str, private: Collection[str] | None = None) -> ReturnReading | None:
    """How each returned value of the submitted function derives from its `private` arguments
    (default: all of them); None when the source holds no function to read."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    entry = _entry_function(tree)
    if entry is None:
        return None
    local_functions = {
        n.name: n for n in ast.walk(entry) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n is not entry
    }
    tracer = _Tracer(local_functions)
    arguments = entry.args
    params = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
    params += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
    for param in params:
        tracer.env[param] = PRIVATE if private is None or param in private else CLEAN
    tracer.run(entry.body)
    return ReturnReading(tuple(tracer.returns))


def describe_steps(steps: frozenset[Step]) -> str:
    return ", ".join(f"{what} at line {line}" for line, what in sorted(steps))
