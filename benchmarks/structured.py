"""What guided decoding costs through Triton (the ``grammar_compile`` and ``structured_c32`` sub-phases of
benchmarks.gpu_harness; issue 18's targets).

* :func:`throughput` — a closed loop of document images, every request held to :data:`INVOICE_SCHEMA`
  (the ensemble's ``guided_decoding_guide_type`` = ``json_schema``, ``guided_decoding_guide`` = the schema),
  then the same loop without a schema on other images of the same size, each answer exactly as long as the
  guided answers were on average (``min_tokens`` = ``max_tokens``), so both runs decode the same number of
  tokens. The schema is compiled by one request before the guided run: the run measures decoding under a
  grammar, :func:`compile_ttft` measures compiling one. Every guided answer is parsed and validated.
* :func:`compile_ttft` — TTFT (``max_tokens`` 1) of a request whose schema the server has never seen (the
  invoice schema with one more property of a random name, so it is compiled), of the same schema again
  (cached by schema), and of no schema, interleaved; the first guided request of the server (which also
  builds the grammar compiler's tokenizer tables) is reported on its own.

Validation uses ``jsonschema`` where it imports (the GPU machine lacks it), else :func:`schema_errors`, which
checks the keywords these schemas use. ``valid_fraction`` counts every request sent: an error or a cut-off
answer is not a valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import uuid
from collections import Counter
from collections.abc import Callable

from benchmarks.clients import RequestParams
from benchmarks.corpus import Corpus, Sample
from benchmarks.metrics import RequestRecord, distribution_ms, percentile, steady_state, summarize

TARGET_RATIO = 0.9  # issue 18: output tok/s with a schema on every request >= 0.9 x without
QUESTION = (
    "Extract this invoice as JSON: invoice_number, issue_date, vendor, currency, line_items "
    "(description, quantity, unit_price), total and status."
)
# Every string, array and number is bounded, so even a random model under greedy decoding (the hardest case:
# it never wants to close a string) ends every answer by the grammar: the longest answer the schema allows
# is 518 characters, about 830 tokens if every character of the free strings came as single bytes.
INVOICE_SCHEMA: dict = {
    "title": "invoice",
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string", "pattern": "^[A-Z]{2,3}-[0-9]{4,8}$"},
        "issue_date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"},
        "vendor": {"type": "string", "minLength": 1, "maxLength": 32},
        "currency": {"enum": ["EUR", "USD", "GBP", "CNY", "JPY"]},
        "line_items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "description": {"type": "string", "minLength": 1, "maxLength": 24},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
                    "unit_price": {"type": "number", "minimum": 0, "maximum": 100000},
                },
                "required": ["description", "quantity", "unit_price"],
                "additionalProperties": False,
            },
        },
        "total": {"type": "number", "minimum": 0, "maximum": 1000000},
        "status": {"enum": ["paid", "due", "overdue", "disputed"]},
        "vat_included": {"type": "boolean"},
    },
    "required": [
        "invoice_number",
        "issue_date",
        "vendor",
        "currency",
        "line_items",
        "total",
        "status",
        "vat_included",
    ],  # fmt: skip
    "additionalProperties": False,
}
MAX_TOKENS = 1024
STUB_HINT = (
    "the llm imports xgrammar (and pydantic) inside Triton's Python backend stubs, which ignore PYTHONPATH: "
    "install .whl/llm/*.whl into the interpreter's own environment (benchmarks.gpu_harness does when it "
    "finds .whl/llm; see meta.llm_wheels)"
)


def invoice_schema(variant: str | None = None) -> dict:
    """:data:`INVOICE_SCHEMA`, or for a ``variant`` name a schema of about its size with one more required
    property, ``reference_<variant>`` (a new name: a schema no server has compiled yet)."""
    schema = copy.deepcopy(INVOICE_SCHEMA)
    if variant is not None:
        key = f"reference_{variant}"
        schema["properties"][key] = {"type": "string", "pattern": "^[A-Z0-9]{4,10}$"}
        schema["required"].append(key)
    return schema


def guided_decoding_problem() -> str | None:
    """Why guided requests cannot be measured from this interpreter, or None: xgrammar (with pydantic,
    which it imports) must import here."""
    try:
        import xgrammar  # noqa: F401
    except Exception as exc:
        return f"xgrammar cannot be imported ({type(exc).__name__}: {exc}); {STUB_HINT}"
    return None


def _is_type(value: object, name: str) -> bool:
    if name == "integer":
        is_whole_float = isinstance(value, float) and value.is_integer()
        return (isinstance(value, int) and not isinstance(value, bool)) or is_whole_float
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    return isinstance(value, types[name])


def _equal(a: object, b: object) -> bool:
    """JSON equality: true is not 1."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _outside(size: int, schema: dict, low: str, high: str) -> bool:
    return size < schema.get(low, 0) or (high in schema and size > schema[high])


def schema_errors(value: object, schema: dict, path: str = "$") -> list[str]:
    """What in ``value`` breaks ``schema``; [] when it validates. Checks type, enum, const, properties,
    required, additionalProperties, items, minItems/maxItems, minLength/maxLength, pattern, minimum/maximum
    and exclusiveMinimum/exclusiveMaximum (what INVOICE_SCHEMA uses); other keywords are not checked."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is_type(value, t) for t in types):
            return [f"{path}: {json.dumps(value, ensure_ascii=False)[:40]} is not of type {'/'.join(types)}"]
    errors = []
    if "enum" in schema and not any(_equal(value, option) for option in schema["enum"]):
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and not _equal(value, schema["const"]):
        errors.append(f"{path}: {value!r} is not {schema['const']!r}")
    if isinstance(value, dict):
        errors += [f"{path}: {key!r} is missing" for key in schema.get("required", []) if key not in value]
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: {key!r} is not allowed")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, f"{path}.{key}")
    if isinstance(value, list):
        if _outside(len(value), schema, "minItems", "maxItems"):
            errors.append(f"{path}: {len(value)} items, outside minItems/maxItems")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, str):
        if _outside(len(value), schema, "minLength", "maxLength"):
            errors.append(f"{path}: {len(value)} characters, outside minLength/maxLength")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            errors.append(f"{path}: {value!r} does not match {schema['pattern']!r}")
    if _is_type(value, "number"):
        for key, holds in (
            ("minimum", lambda bound: value >= bound),
            ("maximum", lambda bound: value <= bound),
            ("exclusiveMinimum", lambda bound: value > bound),
            ("exclusiveMaximum", lambda bound: value < bound),
        ):
            if key in schema and not holds(schema[key]):
                errors.append(f"{path}: {value} breaks {key} {schema[key]}")
    return errors


def validator(schema: dict) -> tuple[str, Callable[[object], list[str]]]:
    """(name, value -> error messages) for ``schema``: jsonschema's validator where it imports, else
    :func:`schema_errors`."""
    try:
        import jsonschema
    except ImportError:
        return "builtin (benchmarks.structured.schema_errors)", lambda value: schema_errors(value, schema)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    checker = cls(schema)
    return "jsonschema", lambda value: [f"{e.json_path}: {e.message}" for e in checker.iter_errors(value)]


def check_answers(records: list[RequestRecord], schema: dict) -> dict:
    """How many answers (``RequestRecord.text``) parse as JSON and validate against ``schema``."""
    name, errors_of = validator(schema)
    num_parsed = num_valid = 0
    problems: list[str] = []
    for record in records:
        if not record.is_ok:
            continue
        try:
            value = json.loads(record.text)
        except ValueError as exc:
            problems.append(f"not JSON ({exc}; finish_reason {record.finish_reason}): {record.text[-80:]!r}")
            continue
        num_parsed += 1
        errors = errors_of(value)
        if errors:
            problems.append("; ".join(errors[:3]))
        else:
            num_valid += 1
    return {
        "requests": len(records),
        "answers": sum(r.is_ok for r in records),
        "parsed": num_parsed,
        "valid": num_valid,
        "valid_fraction": round(num_valid / len(records), 4) if records else None,
        "finish_reasons": dict(Counter(r.finish_reason for r in records if r.is_ok)),
        "validator": name,
        "problems": problems[:3],
        "example": next((r.text for r in records if r.is_ok and r.text), None),
    }


class _Asking:
    """``corpus`` with every sample asking ``question``."""

    def __init__(self, corpus: Corpus, question: str) -> None:
        self.corpus, self.question = corpus, question

    def __len__(self) -> int:
        return len(self.corpus)

    def sample(self, index: int) -> Sample:
        return dataclasses.replace(self.corpus.sample(index), question=self.question)


def _documents(size: tuple[int, int], count: int, seed: int, workers: int = 1) -> _Asking:
    corpus = Corpus(sizes=[size], kinds=("document",), pool_size=count, seed=seed, workers=workers)
    return _Asking(corpus, QUESTION)


def _guided(schema: dict, max_tokens: int) -> RequestParams:
    return RequestParams(
        max_tokens=max_tokens,
        ignore_eos=False,
        guide_type="json_schema",
        guide=json.dumps(schema),
        keep_text=True,
        timeout_s=300,
    )


async def _closed(target, corpus, params, concurrency: int, num_requests: int, duration_s: float, label: str):
    from benchmarks.run import timed_closed_loop

    return await timed_closed_loop(target, corpus, params, concurrency, num_requests, duration_s, label)


def _error(record: RequestRecord) -> dict:
    out = {"error": f"the first guided request failed: {record.error}"}
    if any(word in (record.error or "") for word in ("xgrammar", "pydantic", "No module named")):
        out["hint"] = STUB_HINT
    return out


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


async def throughput(
    target,
    image_size: tuple[int, int],
    concurrency: int,
    num_requests: int,
    duration_s: float,
    *,
    seed: int,
    workers: int = 1,
    max_tokens: int = MAX_TOKENS,
) -> dict:
    """The closed loop with :data:`INVOICE_SCHEMA` on every request, then without a schema, each request
    answering as many tokens as the guided request sent in its place; both summaries, the guided answers'
    check and the ratios with / without."""
    # seeds seed .. seed + 2 * num_requests: every request brings an image no other request brought
    guided_corpus = _documents(image_size, num_requests + 1, seed, workers)  # the last one compiles
    plain_corpus = _documents(image_size, num_requests, seed + num_requests + 1, workers)
    guided = _guided(INVOICE_SCHEMA, max_tokens)
    first = await target.send(guided_corpus.sample(num_requests), guided)
    if first.error:
        return _error(first)
    records, wall = await _closed(
        target, guided_corpus, guided, concurrency, num_requests, duration_s, "schema"
    )
    with_schema = {**summarize(records, wall), "steady": steady_state(records, concurrency)}
    with_schema["answers"] = check_answers(records, INVOICE_SCHEMA)
    if not with_schema["requests"]:
        raise RuntimeError(f"no guided request succeeded: {with_schema['error_messages']}")
    length = max(1, round(with_schema["mean_output_tokens"]))
    # Request i without a schema answers as many tokens as guided request i did (sent in the same order,
    # at the same concurrency), so both runs end and admit requests at the same points: answers of one
    # length would end together and admit the next requests in bursts, which is not what guided load does.
    # keep_text here too: the client does the same work per response in both runs.
    lengths = [max(1, r.num_output_tokens) for r in sorted(records, key=lambda r: r.start_s) if r.is_ok]
    plain = [RequestParams(max_tokens=n, ignore_eos=True, keep_text=True, timeout_s=300) for n in lengths]
    records, wall = await _closed(target, plain_corpus, plain, concurrency, num_requests, duration_s, "plain")
    without = {**summarize(records, wall), "steady": steady_state(records, concurrency)}
    steady_with, steady_without = with_schema["steady"] or {}, without["steady"] or {}
    ratio = {
        "output_tok_s": _ratio(with_schema["output_tok_s"], without["output_tok_s"]),
        "rps": _ratio(with_schema["rps"], without["rps"]),
        "steady_output_tok_s": _ratio(steady_with.get("output_tok_s"), steady_without.get("output_tok_s")),
        # > 1: slower with the schema
        "itl_p50": _ratio(with_schema["itl_ms"]["p50"], without["itl_ms"]["p50"]),
        "itl_p99": _ratio(with_schema["itl_ms"]["p99"], without["itl_ms"]["p99"]),
        "ttft_p50": _ratio(with_schema["ttft_ms"]["p50"], without["ttft_ms"]["p50"]),
    }
    return {
        "image_size": f"{image_size[0]}x{image_size[1]}",
        "concurrency": concurrency,
        "schema": "invoice (benchmarks.structured.INVOICE_SCHEMA)",
        "max_tokens": max_tokens,
        "plain_tokens_per_answer": length,  # the mean; each answer's length in plain_answer_lengths
        "plain_answer_lengths": lengths,
        "with_schema": with_schema,
        "without_schema": without,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": None if ratio["output_tok_s"] is None else ratio["output_tok_s"] >= TARGET_RATIO,
    }


def _paired_median_ms(later: list[RequestRecord], earlier: list[RequestRecord], field: str) -> float | None:
    """Median over repetitions of ``later[i].field - earlier[i].field``, in ms (pairs where both are known)."""
    deltas = [
        getattr(a, field) - getattr(b, field)
        for a, b in zip(later, earlier, strict=True)
        if a.is_ok and b.is_ok and getattr(a, field) is not None and getattr(b, field) is not None
    ]
    return round(percentile(deltas, 50) * 1e3, 3) if deltas else None


async def compile_ttft(target, image_size: tuple[int, int], repetitions: int, *, seed: int) -> dict:
    """TTFT of a never-seen schema, the same schema again and no schema, ``repetitions`` times each."""
    corpus = _documents(image_size, 3 * repetitions + 1, seed)
    first = await target.send(corpus.sample(0), _guided(invoice_schema(uuid.uuid4().hex[:8]), 1))
    if first.error:
        return _error(first)
    plain = RequestParams(max_tokens=1, ignore_eos=False, timeout_s=120)
    new, same, none = [], [], []
    for i in range(repetitions):
        params = _guided(invoice_schema(uuid.uuid4().hex[:8]), 1)
        new.append(await target.send(corpus.sample(3 * i + 1), params))
        same.append(await target.send(corpus.sample(3 * i + 2), params))
        none.append(await target.send(corpus.sample(3 * i + 3), plain))

    def runs(records: list[RequestRecord]) -> dict:
        ok = [r for r in records if r.is_ok]
        return {
            "requests": len(ok),
            "errors": len(records) - len(ok),
            "ttft_ms": distribution_ms(r.ttft_s for r in ok if r.ttft_s is not None),
            "server_ttft_ms": distribution_ms(r.server_ttft_s for r in ok if r.server_ttft_s is not None),
            "error_messages": sorted({r.error for r in records if r.error})[:3],
        }

    return {
        "image_size": f"{image_size[0]}x{image_size[1]}",
        "repetitions": repetitions,
        "first_guided_ttft_ms": round(first.ttft_s * 1e3, 3) if first.ttft_s is not None else None,
        "new_schema": runs(new),
        "same_schema": runs(same),
        "no_schema": runs(none),
        # medians of the per-repetition differences (each repetition: new, same, none back to back)
        "compile_ms": _paired_median_ms(new, same, "ttft_s"),
        "cached_schema_ms": _paired_median_ms(same, none, "ttft_s"),
        "server_compile_ms": _paired_median_ms(new, same, "server_ttft_s"),
        "server_cached_schema_ms": _paired_median_ms(same, none, "server_ttft_s"),
    }
