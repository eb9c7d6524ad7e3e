"""What a request asks its output to match, parsed from its fields: :class:`GrammarSpec`.

Pure Python (no torch, no grammar library): the ingest parses these fields before it stores a
request, and a spec's canonical text is what a worker compiles and caches.

Canonical JSON schemas: every object's keys sorted and compact separators, so that equal
schemas written differently share one compiled grammar -- except the order of a
``properties`` map, which is kept. The grammar emits properties in that order, and the order
matters to the model (a ``reasoning`` property declared before ``answer`` is generated first),
so two schemas that differ only there are different grammars.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
GRAMMAR_KINDS: frozenset[str] = frozenset(GrammarKind.__args__)  # type: ignore[attr-defined]
#: OpenAI's rule for function names; it also keeps a call's JSON head free of escapes.
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")

#: Default bound on a spec's canonical text: large enough for real schemas (OpenAI allows
#: about 15k characters of property names and enum values), small enough that one request
#: cannot make every worker spend seconds compiling and megabytes caching.
DEFAULT_MAX_BYTES = 64 * 1024

#: The schema every ``json_object`` request gets: any JSON object.
JSON_OBJECT_SCHEMA = '{"type":"object"}'

#: Keywords whose value maps names to subschemas (canonicalised as schemas, not data).
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                          "dependentSchemas"})
#: Keywords whose value is data (enum members, defaults): never treated as schemas.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


#: Deepest JSON value a schema may be: the canonical form and the library's compiler both
#: recurse on it, and a native stack overflow would take the process down, not one request.
MAX_SCHEMA_DEPTH = 64


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return deepest


def _bracket_depth(text: str) -> int:
    """Deepest nesting of ``(``/``[``/``{`` in a regex or grammar text (escapes and quotes
    are not parsed: an upper bound is what the limit needs)."""
    deepest = depth = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(0, depth - 1)
    return deepest


def tool_call_head(name: str) -> str:
    """The text a forced call of function ``name`` starts with, up to its arguments' JSON:
    :meth:`GrammarSpec.for_tool_call` fixes the key order and the compiler's JSON layout
    (``compiler.JSON_OPTIONS``) the separators. Function names match
    :data:`FUNCTION_NAME`, so the name needs no escape."""
    return f'{{"name": {json.dumps(name)}, "arguments": '


def tool_call_text(name: str, arguments: str) -> str:
    """A whole forced call's text, ``arguments`` being its arguments' JSON text."""
    return f"{tool_call_head(name)}{arguments}}}"


class GrammarError(ValueError):
    """A request's grammar fields are unusable; ``field`` names the offending one.

    The message starts with the field and says how to fix it: the ingest returns it as an
    HTTP 400 with ``param`` = ``field``.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def _canonical(node: Any, *, ordered: bool = False) -> Any:
    """``node`` with every dict's keys sorted, except a map whose order is meaningful
    (``ordered``: the names of a ``properties`` map, kept in the order written)."""
    if isinstance(node, list):
        return [_canonical(item) for item in node]
    if not isinstance(node, dict):
        return node
    keys = list(node) if ordered else sorted(node)
    out: dict[str, Any] = {}
    for key in keys:
        value = node[key]
        if ordered or key in _DATA_KEYWORDS:
            out[key] = _canonical(value)
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            # property order is generation order; the other maps' order means nothing
            keep = key == "properties"
            out[key] = {k: _canonical(v) for k, v in
                        (value.items() if keep else sorted(value.items()))}
        else:
            out[key] = _canonical(value)
    return out


def canonical_json(value: Any) -> str:
    """``value`` serialised canonically (see the module's docstring)."""
    return json.dumps(_canonical(value), separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def declared_functions(tools: Any) -> dict[str, tuple[dict[str, Any], str]]:
    """The functions ``tools`` declares: name -> (parameters schema, its field), in order.
    A function without ``parameters`` takes none.

    Raises:
        GrammarError: not a non-empty list of ``{"type": "function", "function": {...}}``
            with unique, valid names and object parameters, naming the field.
    """
    if not isinstance(tools, list) or not tools:
        raise GrammarError("tools", "must be a non-empty list of "
                                    '{"type": "function", "function": {...}}')
    functions: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise GrammarError(f"{where}.type", 'must be "function"')
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise GrammarError(f"{where}.function", "must be an object with a name")
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise GrammarError(f"{where}.function.name", "is required: 1 to 64 letters, "
                               "digits, underscores or dashes (OpenAI's rule)")
        if name in functions:
            raise GrammarError(f"{where}.function.name",
                               f"{name!r} is declared twice; names must be unique")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, dict):
            raise GrammarError(f"{where}.function.parameters",
                               "must be a JSON schema object")
        functions[name] = (params, f"{where}.function.parameters")
    return functions


@dataclass(frozen=True)
class GrammarSpec:
    """One grammar: its ``kind`` and canonical ``text``; equal specs compile to one grammar.

    ``field`` is where the spec came from (for the errors of compiling it); it is not part of
    equality or the hash, so the same schema sent under two fields is one cache entry.

    ``text`` by kind: ``json_schema`` -- the canonical schema; ``json_object`` --
    :data:`JSON_OBJECT_SCHEMA`; ``regex`` -- the regular expression (Rust ``regex`` syntax,
    matched against the whole output); ``choice`` -- the canonical JSON list of the
    choices, sorted and without duplicates; ``grammar`` -- a context-free grammar in
    llguidance's Lark syntax, or GBNF (llama.cpp's, recognised by ``::=``).
    """

    kind: GrammarKind
    text: str
    field: str = field(default="", compare=False, hash=False)

    @property
    def key(self) -> str:
        """The cache key: kind and canonical text (what a request record stores)."""
        return f"{self.kind}:{self.text}"

    @classmethod
    def from_key(cls, key: str, field: str = "grammar") -> GrammarSpec:
        """The spec whose :attr:`key` is ``key`` (a worker reads it from the request).

        Raises:
            GrammarError: ``key`` is not a spec's key.
        """
        kind, sep, text = key.partition(":")
        if not sep or kind not in GRAMMAR_KINDS or not text:
            raise GrammarError(field, f"{key[:40]!r} is not a grammar key (<kind>:<text>)")
        return cls(kind, text, field)  # type: ignore[arg-type]

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def json_schema(cls, schema: Any, field: str,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> GrammarSpec:
        """A JSON schema given as a dict, or as a JSON string that holds one."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise GrammarError(field, f"is not valid JSON ({exc}); send a JSON schema "
                                          "object or a string holding one") from None
        if not isinstance(schema, dict):
            raise GrammarError(field, "must be a JSON schema object, such as "
                                      '{"type": "object", "properties": {...}}')
        depth = _depth(schema)
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(field, f"is nested {depth} levels deep, over the limit of "
                                      f"{MAX_SCHEMA_DEPTH}; flatten it or use $defs")
        try:
            text = canonical_json(schema)
        except ValueError as exc:  # NaN or infinity: not JSON
            raise GrammarError(field, f"is not valid JSON: {exc}") from None
        return cls._sized("json_schema", text, field, max_bytes)

    @classmethod
    def regex(cls, pattern: Any, field: str,
              max_bytes: int = DEFAULT_MAX_BYTES) -> GrammarSpec:
        """A regular expression the whole output must match."""
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError(field, "must be a non-empty regular expression string")
        return cls._sized("regex", pattern, field, max_bytes)

    @classmethod
    def choice(cls, choices: Any, field: str,
               max_bytes: int = DEFAULT_MAX_BYTES) -> GrammarSpec:
        """The output is exactly one of ``choices`` (a non-empty list of non-empty strings)."""
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise GrammarError(field, 'must be a non-empty list of non-empty strings, such '
                                      'as ["yes", "no"]')
        text = json.dumps(sorted(set(choices)), separators=(",", ":"), ensure_ascii=False)
        return cls._sized("choice", text, field, max_bytes)

    @classmethod
    def grammar(cls, text: Any, field: str,
                max_bytes: int = DEFAULT_MAX_BYTES) -> GrammarSpec:
        """A context-free grammar: Lark (llguidance's dialect) or GBNF."""
        if not isinstance(text, str) or not text.strip():
            raise GrammarError(field, "must be a non-empty grammar string (Lark syntax, "
                                      'e.g. start: "yes" | "no"; or GBNF with ::=)')
        return cls._sized("grammar", text, field, max_bytes)

    @classmethod
    def _sized(cls, kind: GrammarKind, text: str, field: str, max_bytes: int) -> GrammarSpec:
        size = len(text.encode("utf-8"))
        if size > max_bytes:
            raise GrammarError(field, f"is {size} bytes (canonical form), over the limit of "
                                      f"{max_bytes}; send a smaller one")
        if kind in ("regex", "grammar") and _bracket_depth(text) > MAX_SCHEMA_DEPTH:
            raise GrammarError(field, f"nests brackets more than {MAX_SCHEMA_DEPTH} deep; "
                                      "send a flatter one")
        return cls(kind, text, field)

    @classmethod
    def from_response_format(cls, value: Any,
                             max_bytes: int = DEFAULT_MAX_BYTES) -> GrammarSpec | None:
        """OpenAI's ``response_format``: None for ``{"type": "text"}`` (unconstrained).

        ``{"type": "json_object"}`` -> any JSON object; ``{"type": "json_schema",
        "json_schema": {"name": ..., "schema": {...}, "strict": bool, "description": ...}}``
        -> that schema. ``strict`` is accepted either way: the schema is always enforced
        in full, and a keyword the grammar cannot enforce is an error, never ignored.
        """
        if not isinstance(value, dict):
            raise GrammarError("response_format", 'must be an object such as {"type": '
                                                  '"json_object"}')
        kind = value.get("type")
        allowed_keys = {"text": {"type"}, "json_object": {"type"},
                        "json_schema": {"type", "json_schema"}}
        if kind not in allowed_keys:
            raise GrammarError("response_format.type", f"unknown type {kind!r}; use one of "
                                                       "text, json_object, json_schema")
        extra = sorted(set(value) - allowed_keys[kind])
        if extra:
            raise GrammarError(f"response_format.{extra[0]}",
                               f"not a field of a {kind!r} response_format; remove it")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object", JSON_OBJECT_SCHEMA, "response_format")
        body = value.get("json_schema")
        if not isinstance(body, dict):
            raise GrammarError("response_format.json_schema",
                               'must be an object: {"name": ..., "schema": {...}}')
        extra = sorted(set(body) - {"name", "schema", "strict", "description"})
        if extra:
            raise GrammarError(f"response_format.json_schema.{extra[0]}",
                               "unknown field; allowed: name, schema, strict, description")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise GrammarError("response_format.json_schema.name",
                               "is required: a non-empty string naming the schema")
        if "strict" in body and not isinstance(body["strict"], bool | None):
            raise GrammarError("response_format.json_schema.strict", "must be a boolean")
        if "schema" not in body:
            raise GrammarError("response_format.json_schema.schema",
                               "is required: the JSON schema the output must match")
        return cls.json_schema(body["schema"], "response_format.json_schema.schema", max_bytes)

    @classmethod
    def from_structured_outputs(cls, value: Any,
                                max_bytes: int = DEFAULT_MAX_BYTES) -> GrammarSpec:
        """vLLM's ``structured_outputs`` extra: exactly one of ``json`` (a schema, as a dict
        or a JSON string), ``regex``, ``choice`` (list of strings), ``grammar`` (string),
        ``json_object`` (true)."""
        field = "structured_outputs"
        if not isinstance(value, dict):
            raise GrammarError(field, 'must be an object with one of json, regex, choice, '
                                      'grammar, e.g. {"choice": ["yes", "no"]}')
        kinds = ("json", "regex", "choice", "grammar", "json_object")
        unknown = sorted(set(value) - set(kinds))
        if unknown:
            raise GrammarError(f"{field}.{unknown[0]}",
                               "not supported; use exactly one of " + ", ".join(kinds))
        given = [k for k in kinds if value.get(k) not in (None, False)]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise GrammarError(field, f"needs exactly one of {', '.join(kinds)} (got {what})")
        key = given[0]
        sub = f"{field}.{key}"
        if key == "json":
            return cls.json_schema(value[key], sub, max_bytes)
        if key == "regex":
            return cls.regex(value[key], sub, max_bytes)
        if key == "choice":
            return cls.choice(value[key], sub, max_bytes)
        if key == "grammar":
            return cls.grammar(value[key], sub, max_bytes)
        if value[key] is not True:
            raise GrammarError(sub, "must be true")
        return cls("json_object", JSON_OBJECT_SCHEMA, sub)

    @classmethod
    def for_tool_call(cls, tools: Any, tool_choice: Any,
                      max_bytes: int = DEFAULT_MAX_BYTES) -> GrammarSpec | None:
        """The grammar of a forced tool call; None when ``tool_choice`` forces none.

        ``tool_choice``: ``"required"`` (any declared function), ``{"type": "function",
        "function": {"name": ...}}`` (that one), or ``"auto"`` / ``"none"`` / None
        (None: the output is not constrained). The output is one JSON object::

            {"name": "<function name>", "arguments": {<matches the function's parameters>}}

        in that key order, which maps onto OpenAI's ``tool_calls[0].function`` (whose
        ``arguments`` is this object serialised as a string). A function without
        ``parameters`` takes none: its ``arguments`` is ``{}``.
        """
        if tool_choice in (None, "auto", "none"):
            return None
        functions = declared_functions(tools)
        if tool_choice == "required":
            chosen = list(functions)
            field = "tools"
        elif (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
              and isinstance(tool_choice.get("function"), dict)):
            name = tool_choice["function"].get("name")
            if name not in functions:
                raise GrammarError("tool_choice.function.name",
                                   f"{name!r} is not among the declared tools "
                                   f"({', '.join(functions)})")
            chosen = [name]
            field = functions[name][1]
        else:
            raise GrammarError("tool_choice", 'must be "none", "auto", "required" or '
                                              '{"type": "function", "function": {"name": ...}}')
        variants = [
            {"type": "object",
             "properties": {"name": {"const": name}, "arguments": functions[name][0]},
             "required": ["name", "arguments"], "additionalProperties": False}
            for name in chosen
        ]
        schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
        return cls.json_schema(schema, field, max_bytes)
