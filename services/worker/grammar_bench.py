"""``scls grammar-bench``: what a grammar library costs the decode loop, and what it covers.

Measures llguidance (the library shared/grammar uses) and, when it is installed, xgrammar,
on the same vocabularies: SmolLM2-135M's 49152-token BPE and tiny-random's 512-id byte
codec. docs/structured-outputs.md holds the figures and the choice they led to.

* cold compile time of :data:`BENCH_SCHEMAS` (20 JSON schemas), a regex, a choice list and
  a small GBNF grammar (llguidance takes GBNF as well as Lark; xgrammar takes GBNF);
* per-step mask time for a batch of 16 rows, each midway through a JSON document, along the
  same token walks for both libraries, and the time to apply the batch's bitmask to float32
  logits [16, vocab] in torch;
* feature probes (each a small grammar that must compile) and whether importing the library
  pulls in torch (the ingest has none).
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

# -- the corpus ---------------------------------------------------------------------------

_ADDRESS = {"type": "object", "properties": {
    "street": {"type": "string", "maxLength": 40}, "city": {"type": "string", "maxLength": 30},
    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
    "required": ["street", "city"], "additionalProperties": False}

#: Twenty JSON schemas covering what structured outputs are used for.
BENCH_SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0,
                                              "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                                      "confidence": {"type": "number", "minimum": 0,
                                                     "maximum": 1}},
     "required": ["answer", "confidence"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string",
                                                                          "maxLength": 10},
                                               "minItems": 1, "maxItems": 4}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"address": _ADDRESS, "phone": {
        "type": "string", "pattern": r"^\+?[0-9]{7,12}$"}},
     "required": ["address"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
     "minItems": 2, "maxItems": 6},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}},
     "required": ["ok", "note"], "additionalProperties": False},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"},
                                                           "y": {"type": "integer"}},
                         "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"start": {"$ref": "#/$defs/point"},
                                      "end": {"$ref": "#/$defs/point"}},
     "required": ["start", "end"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"},
                                                          {"type": "string", "maxLength": 8}]}},
     "required": ["value"], "additionalProperties": False},
    {"type": "object", "properties": {
        "reasoning": {"type": "string", "maxLength": 60},
        "steps": {"type": "array", "items": {"type": "string", "maxLength": 20},
                  "maxItems": 3},
        "final": {"type": "number"}},
     "required": ["reasoning", "final"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"},
                                      "when": {"type": "string", "format": "date"}},
     "required": ["id", "when"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]},
                                      "label": {"const": "fixed"}},
     "required": ["level", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 3, "items": {
        "type": "array", "items": {"type": "number", "minimum": 0, "maximum": 9},
        "minItems": 1, "maxItems": 3}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "login": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,11}$"},
        "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]},
                  "maxItems": 3}}, "required": ["login"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string", "minLength": 3,
                                                "maxLength": 25},
                                      "year": {"type": "integer", "minimum": 1900,
                                               "maximum": 2100}},
     "required": ["title"], "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "number", "exclusiveMinimum": 0,
                                                "maximum": 1000},
                                      "currency": {"enum": ["EUR", "USD", "GBP"]}},
     "required": ["price", "currency"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "circle"},
                                      "radius": {"type": "number", "minimum": 0}},
     "required": ["kind", "radius"]},
    {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2,
                                                "items": _ADDRESS}},
     "required": ["items"], "additionalProperties": False},
    {"type": "string", "enum": ["red", "green", "blue"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"type": "boolean"}},
              "required": ["c"], "additionalProperties": False}},
        "required": ["b"], "additionalProperties": False}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "arguments": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 20},
                                          "unit": {"enum": ["c", "f"]}},
                                          "required": ["city"],
                                          "additionalProperties": False}},
     "required": ["name", "arguments"], "additionalProperties": False},
]
BENCH_REGEX = r"[A-Z][a-z]{2,8} [0-9]{1,3}(\.[0-9]{1,2})? (kg|g|lb)"
BENCH_CHOICE = ["positive", "negative", "neutral", "mixed feelings", "n/a"]
#: A small arithmetic grammar in GBNF, which both libraries read.
BENCH_GBNF = r"""root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= num | "(" expr ")"
num ::= [0-9]+"""

#: Features the grammar layer needs, as schemas / grammars that must compile.
FEATURE_PROBES: dict[str, tuple[str, Any]] = {
    "json: nested objects": ("json", BENCH_SCHEMAS[18]),
    "json: enum": ("json", {"enum": ["a", "b"]}),
    "json: array minItems/maxItems": ("json", BENCH_SCHEMAS[4]),
    "json: number minimum/maximum": ("json", {"type": "number", "minimum": 0.5,
                                              "maximum": 2.5}),
    "json: optional fields": ("json", BENCH_SCHEMAS[13]),
    "json: additionalProperties false": ("json", BENCH_SCHEMAS[0]),
    "json: $ref/$defs": ("json", BENCH_SCHEMAS[6]),
    "json: anyOf": ("json", BENCH_SCHEMAS[7]),
    "json: string pattern/minLength": ("json", BENCH_SCHEMAS[12]),
    "regex": ("regex", BENCH_REGEX),
    "choice": ("choice", BENCH_CHOICE),
    "grammar: GBNF": ("gbnf", BENCH_GBNF),
    "grammar: Lark": ("lark", 'start: expr\nexpr: NUM ("+" NUM)*\nNUM: /[0-9]+/'),
}

# -- walks --------------------------------------------------------------------------------


def closer_ids(decode: Callable[[list[int]], str], vocab_size: int) -> np.ndarray:
    """One bool per id: True where the id's text only closes JSON (quotes, braces,
    brackets). A walk past its budget prefers them, so that it ends."""
    flags = np.zeros(vocab_size, dtype=bool)
    for i in range(vocab_size):
        text = decode([i])
        flags[i] = bool(text) and set(text) <= set('"}]')
    return flags


def random_walk(row: Any, rng: random.Random, closers: np.ndarray, budget: int,
                max_steps: int) -> list[int]:
    """Advance ``row`` (a :class:`~shared.grammar.matcher.RowGrammar`) by random allowed
    tokens until it finishes. Within ``budget`` steps it never picks EOS; after, it takes
    EOS when allowed, else a closing token when one is allowed. Returns the tokens, EOS
    excluded."""
    vocab = row.compiled.vocab
    eos = np.zeros(vocab.vocab_size, dtype=bool)
    eos[sorted(vocab.eos_ids)] = True
    closing = np.zeros(vocab.vocab_size, dtype=bool)
    closing[: len(closers)] = closers[: vocab.vocab_size]
    tokens: list[int] = []
    for step in range(max_steps):
        if row.is_finished():
            return tokens
        allowed = row.allowed_bits()
        if not allowed.any():
            raise RuntimeError("no token allowed before the grammar finished")
        if step >= budget:
            if (allowed & eos).any():
                return tokens
            if (allowed & closing).any():
                allowed = allowed & closing
        elif (allowed & ~eos).any():  # within the budget: explore past accepting states
            allowed = allowed & ~eos
        choices = np.flatnonzero(allowed)
        token = int(choices[rng.randrange(len(choices))])
        if eos[token]:  # only EOS was left
            return tokens
        if not row.advance(token):
            raise RuntimeError(f"allowed token {token} was refused")
        tokens.append(token)
    raise RuntimeError(f"the walk did not finish in {max_steps} steps")


# -- measurement --------------------------------------------------------------------------


def _ms(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p90 and total of ``seconds``, in ms."""
    ordered = sorted(seconds)
    return {"median_ms": round(statistics.median(ordered) * 1e3, 3),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 3),
            "max_ms": round(ordered[-1] * 1e3, 3),
            "total_ms": round(sum(ordered) * 1e3, 1)}


def _time_apply(apply: Callable[[Any, Any], Any], rows: int, model_vocab: int, bitmask: Any,
                steps: int) -> dict[str, float]:
    """Timings of ``apply(logits, bitmask)`` on fresh random float32 logits, ``steps`` times."""
    import torch  # the CLI imports this module: torch only when the command runs

    logits = torch.randn(rows, model_vocab)
    times = []
    for _ in range(steps):
        x = logits.clone()
        t0 = time.perf_counter()
        apply(x, bitmask)
        times.append(time.perf_counter() - t0)
    return _ms(times)


def _midway(length: int, step: int, steps: int) -> int:
    """Tokens consumed at measurement ``step``: from 25% to 75% of a ``length``-token walk
    (always leaving one token to advance by)."""
    cut = length // 4 + (length // 2) * step // max(steps - 1, 1)
    return min(cut, length - 1)


def _imports_torch(module: str) -> bool | None:
    """Whether importing ``module`` imports torch (None: not installed)."""
    code = (f"import sys\ntry:\n    import {module}\nexcept ImportError:\n    print('missing')"
            "\nelse:\n    print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120).stdout.strip().splitlines()
    last = out[-1] if out else "missing"
    return None if last == "missing" else last == "True"


def _walks(codec: Any, vocab: Any, rows: int, seed: int) -> list[list[int]]:
    """One complete random walk (llguidance) per row, row i on schema i."""
    from shared.grammar.compiler import GrammarCompiler
    from shared.grammar.matcher import RowGrammar
    from shared.grammar.spec import GrammarSpec

    compiler = GrammarCompiler(vocab)
    closers = closer_ids(codec.decode, vocab.tokenizer_size)
    rng = random.Random(seed)
    walks = []
    for i in range(rows):
        spec = GrammarSpec.json_schema(BENCH_SCHEMAS[i % len(BENCH_SCHEMAS)], "bench")
        row = RowGrammar.start(compiler.compile(spec))
        walks.append(random_walk(row, rng, closers, budget=96, max_steps=3000))
    return walks


def bench_llguidance(codec: Any, model_vocab: int, walks: list[list[int]],
                     steps: int) -> dict[str, Any]:
    """Compile, mask and apply times of llguidance through shared/grammar."""

    from shared.grammar.compiler import compile_spec
    from shared.grammar.matcher import RowGrammar, allocate_bitmask, apply_bitmask, fill_bitmask
    from shared.grammar.spec import GrammarSpec
    from shared.grammar.vocab import vocab_from_codec

    start = time.perf_counter()
    vocab = vocab_from_codec(codec, model_vocab)
    out: dict[str, Any] = {"vocab_build_s": round(time.perf_counter() - start, 3)}
    specs = [GrammarSpec.json_schema(s, "bench") for s in BENCH_SCHEMAS]
    times = []
    for spec in specs:
        t0 = time.perf_counter()
        compile_spec(spec, vocab)
        times.append(time.perf_counter() - t0)
    out["compile_json"] = _ms(times)
    for name, spec in (("regex", GrammarSpec.regex(BENCH_REGEX, "bench")),
                       ("choice", GrammarSpec.choice(BENCH_CHOICE, "bench")),
                       ("gbnf", GrammarSpec.grammar(BENCH_GBNF, "bench"))):
        t0 = time.perf_counter()
        compile_spec(spec, vocab)
        out[f"compile_{name}_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    compiled = [compile_spec(specs[i % len(specs)], vocab) for i in range(len(walks))]
    t0 = time.perf_counter()
    for c, w in zip(compiled, walks, strict=True):
        RowGrammar.start(c, w)
    out["replay_all_rows_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    out["replayed_tokens"] = sum(len(w) for w in walks)
    bitmask = allocate_bitmask(len(walks), vocab.vocab_size)
    par, seq, adv = [], [], []
    for step in range(steps):
        # every row midway through its document: 25% .. 75% of its walk over the steps
        cuts = [_midway(len(w), step, steps) for w in walks]
        rows = [RowGrammar.start(c, w[:k]) for c, w, k in zip(compiled, walks, cuts,
                                                                strict=True)]
        t0 = time.perf_counter()
        fill_bitmask(rows, bitmask, parallel=True)
        par.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fill_bitmask(rows, bitmask)
        seq.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for row, w, k in zip(rows, walks, cuts, strict=True):
            row.advance(w[k])
        adv.append(time.perf_counter() - t0)
    out["mask16_parallel"] = _ms(par)
    out["mask16_sequential"] = _ms(seq)
    out["advance16"] = _ms(adv)
    out["apply16_torch"] = _time_apply(apply_bitmask, len(walks), model_vocab, bitmask, steps)
    return out


def _xgr_info(codec: Any, model_vocab: int) -> Any:
    """xgrammar's tokenizer info for our codecs (no transformers objects needed)."""
    import xgrammar as xgr

    from shared.grammar.vocab import _rust_tokenizer_json
    from shared.modeling.registry import ByteCodec

    eos = sorted(codec.eos_ids)
    if isinstance(codec, ByteCodec):
        # specials and unused ids as empty strings: xgrammar treats those as special tokens
        encoded = [bytes([i - 3]) if 3 <= i < 259 else b"" for i in range(model_vocab)]
        return xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=model_vocab,
                                 stop_token_ids=eos)
    import tokenizers

    tok = tokenizers.Tokenizer.from_str(_rust_tokenizer_json(codec))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    encoded = [by_id.get(i, "") for i in range(max(by_id) + 1)]
    return xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=model_vocab,
                             stop_token_ids=eos)


def bench_xgrammar(codec: Any, model_vocab: int, walks: list[list[int]],
                   steps: int) -> dict[str, Any]:
    """The same measurements with xgrammar (its own compiler, matcher and CPU kernel)."""
    import xgrammar as xgr

    start = time.perf_counter()
    info = _xgr_info(codec, model_vocab)
    out: dict[str, Any] = {"vocab_build_s": round(time.perf_counter() - start, 3)}
    layout = {"any_whitespace": False, "separators": (", ", ": ")}

    def fresh() -> Any:  # cache off: every compile is cold
        return xgr.GrammarCompiler(info, cache_enabled=False)

    times, compiled = [], []
    for schema in BENCH_SCHEMAS:
        t0 = time.perf_counter()
        c = fresh().compile_json_schema(json.dumps(schema), **layout)
        xgr.GrammarMatcher(c)
        times.append(time.perf_counter() - t0)
        compiled.append(c)
    out["compile_json"] = _ms(times)
    choice_ebnf = "root ::= " + " | ".join(json.dumps(c) for c in BENCH_CHOICE)
    for name, fn in (("regex", lambda: fresh().compile_regex(BENCH_REGEX)),
                     ("choice", lambda: fresh().compile_grammar(choice_ebnf)),
                     ("gbnf", lambda: fresh().compile_grammar(BENCH_GBNF))):
        t0 = time.perf_counter()
        xgr.GrammarMatcher(fn())
        out[f"compile_{name}_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    refused: set[int] = set()
    bitmask = xgr.allocate_token_bitmask(len(walks), model_vocab)
    seq, adv = [], []
    for step in range(steps):
        cuts = [_midway(len(w), step, steps) for w in walks]
        matchers = []
        for i, (w, k) in enumerate(zip(walks, cuts, strict=True)):
            m = xgr.GrammarMatcher(compiled[i % len(compiled)])
            if not all(m.accept_token(t) for t in w[:k]):
                refused.add(i)
            matchers.append(m)
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        seq.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for m, w, k in zip(matchers, walks, cuts, strict=True):
            m.accept_token(w[k])
        adv.append(time.perf_counter() - t0)
    out["rows_refusing_llguidance_walk"] = len(refused)
    out["mask16_sequential"] = _ms(seq)
    out["advance16"] = _ms(adv)
    out["apply16_kernel"] = _time_apply(xgr.apply_token_bitmask_inplace, len(walks),
                                        model_vocab, bitmask, steps)
    return out


def features(codec: Any, model_vocab: int) -> dict[str, dict[str, Any]]:
    """Which probes each installed library compiles, and whether it needs torch."""
    from shared.grammar.compiler import compile_spec
    from shared.grammar.spec import GrammarError, GrammarSpec
    from shared.grammar.vocab import vocab_from_codec

    result: dict[str, dict[str, Any]] = {"llguidance": {}, "xgrammar": {}}
    vocab = vocab_from_codec(codec, model_vocab)
    for name, (kind, value) in FEATURE_PROBES.items():
        spec = {"json": GrammarSpec.json_schema, "regex": GrammarSpec.regex,
                "choice": GrammarSpec.choice, "gbnf": GrammarSpec.grammar,
                "lark": GrammarSpec.grammar}[kind](value, "probe")
        try:
            compile_spec(spec, vocab)
            result["llguidance"][name] = True
        except GrammarError as exc:
            result["llguidance"][name] = str(exc)
    try:
        import xgrammar as xgr
    except ImportError:
        del result["xgrammar"]
    else:
        compiler = xgr.GrammarCompiler(_xgr_info(codec, model_vocab), cache_enabled=False)
        for name, (kind, value) in FEATURE_PROBES.items():
            try:
                if kind == "json":
                    compiler.compile_json_schema(json.dumps(value), any_whitespace=False)
                elif kind == "regex":
                    compiler.compile_regex(value)
                elif kind == "choice":
                    compiler.compile_grammar("root ::= " + " | ".join(map(json.dumps, value)))
                elif kind == "gbnf":
                    compiler.compile_grammar(value)
                else:
                    result["xgrammar"][name] = "no Lark syntax (EBNF/GBNF only)"
                    continue
                result["xgrammar"][name] = True
            except Exception as exc:  # noqa: BLE001 -- any refusal is the answer
                result["xgrammar"][name] = f"{type(exc).__name__}: {exc}"[:120]
    for lib in list(result):
        result[lib]["imports torch"] = _imports_torch(lib)
    return result


def run(cache_dir: Path, steps: int, seed: int) -> dict[str, Any]:
    """Every measurement, on both vocabularies."""
    from shared.grammar.vocab import vocab_from_codec
    from shared.modeling.registry import SMOLLM2, TINY_RANDOM, load_codec

    try:
        import xgrammar  # noqa: F401
        have_xgr = True
    except ImportError:
        have_xgr = False
    report: dict[str, Any] = {"rows": 16, "steps": steps, "seed": seed, "versions": {}}
    for lib in ("llguidance", "xgrammar", "torch"):
        try:
            report["versions"][lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            report["versions"][lib] = None
    for name, model_vocab in ((SMOLLM2, 49152), (TINY_RANDOM, 512)):
        codec = load_codec(name, cache_dir)
        walks = _walks(codec, vocab_from_codec(codec, model_vocab), 16, seed)
        entry: dict[str, Any] = {
            "vocab": model_vocab,
            "walk_tokens": [len(w) for w in walks],
            "llguidance": bench_llguidance(codec, model_vocab, walks, steps),
        }
        if have_xgr:
            entry["xgrammar"] = bench_xgrammar(codec, model_vocab, walks, steps)
        entry["features"] = features(codec, model_vocab)
        report[name] = entry
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report as a few readable lines."""
    lines = [f"versions: {report['versions']}  (rows {report['rows']}, "
             f"{report['steps']} steps)"]
    for name in ("smollm2-135m", "tiny-random"):
        entry = report[name]
        lines.append(f"== {name} (vocab {entry['vocab']}; walk lengths "
                     f"{min(entry['walk_tokens'])}..{max(entry['walk_tokens'])} tokens)")
        for lib in ("llguidance", "xgrammar"):
            if lib not in entry:
                lines.append(f"  {lib}: not installed, skipped")
                continue
            r = entry[lib]
            cj = r["compile_json"]
            lines.append(
                f"  {lib}: vocab {r['vocab_build_s']} s; compile 20 schemas total "
                f"{cj['total_ms']} ms (median {cj['median_ms']}, max {cj['max_ms']}); "
                f"regex {r['compile_regex_ms']} ms, choice {r['compile_choice_ms']} ms, "
                f"gbnf {r['compile_gbnf_ms']} ms")
            masks = ", ".join(f"{k} median {v['median_ms']} p90 {v['p90_ms']} ms"
                              for k, v in r.items() if k.startswith(("mask16", "apply16",
                                                                      "advance16")))
            lines.append(f"    per step x16 rows: {masks}")
            if "replay_all_rows_ms" in r:
                lines.append(f"    replay {r['replayed_tokens']} tokens over 16 rows: "
                             f"{r['replay_all_rows_ms']} ms")
            if "rows_refusing_llguidance_walk" in r:
                lines.append(f"    rows whose llguidance walk it refused: "
                             f"{r['rows_refusing_llguidance_walk']}")
        for lib, probes in entry["features"].items():
            missing = {k: v for k, v in probes.items() if v is not True and k != "imports torch"}
            lines.append(f"  {lib} features: {len(probes) - 1 - len(missing)}/"
                         f"{len(probes) - 1} probes compile; imports torch: "
                         f"{probes['imports torch']}; refused: {missing or 'none'}")
    return lines


def grammar_bench_command(
    steps: Annotated[int, typer.Option(min=1, help="decode steps measured per row")] = 30,
    seed: Annotated[int, typer.Option(help="seed of the random token walks")] = 0,
    cache_dir: Annotated[Path | None, typer.Option(help="model cache (default: settings)")]
    = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="write results here")]
    = None,
) -> None:
    """Measure grammar compile and per-step mask cost (llguidance, and xgrammar if installed)."""
    from services.config import build_settings

    report = run(cache_dir or build_settings().cache_dir, steps, seed)
    for line in summary_lines(report):
        typer.echo(line)
    if json_file is not None:
        json_file.write_text(json.dumps(report, indent=2) + "\n")
