"""The harness's guided-decoding sub-phases (benchmarks.structured) against the tiny engine behind Triton:
every guided answer of the random model parses and validates, the run without a schema decodes exactly as
many tokens per answer, the compile TTFT figures come back for all three cases, and without xgrammar both
sub-phases record why they were skipped. No timing is asserted (STYLE.md rule 9)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import structured
from benchmarks.clients import RequestParams, make_target
from benchmarks.gpu_harness import Harness, comparisons, serve_phases, table

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

SIZE = (224, 224)


@pytest.fixture(scope="module")
def tiny_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from benchmarks.server import local_triton

    workdir = tmp_path_factory.mktemp("structured_engine")
    with local_triton("tiny", device="cpu", workdir=workdir, log_file=workdir / "triton.log") as server:
        yield server


def _run(kind: str, url: str, coro_fn):
    async def go():
        target = make_target(kind, url, None, 4)
        try:
            return await coro_fn(target)
        finally:
            await target.close()

    return asyncio.run(go())


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.mark.slow
def test_structured_throughput_every_guided_answer_validates(tiny_triton) -> None:
    result = _run(
        "triton",
        tiny_triton.grpc_url,
        lambda target: structured.throughput(
            target, SIZE, concurrency=4, num_requests=8, duration_s=300, seed=5
        ),
    )
    with_schema, without = result["with_schema"], result["without_schema"]
    assert (with_schema["requests"], with_schema["errors"]) == (8, 0), with_schema["error_messages"]
    answers = with_schema["answers"]
    assert answers["validator"] == "jsonschema"
    assert (answers["requests"], answers["parsed"], answers["valid"]) == (8, 8, 8), answers["problems"]
    assert answers["valid_fraction"] == 1.0 and answers["finish_reasons"] == {"stop": 8}
    example = json.loads(answers["example"])
    jsonschema.validate(example, structured.INVOICE_SCHEMA)
    assert structured.schema_errors(example, structured.INVOICE_SCHEMA) == []
    # request i without a schema decodes as many tokens as guided request i: the same answers' lengths
    lengths = result["plain_answer_lengths"]
    assert len(lengths) == 8 and sum(lengths) == round(8 * with_schema["mean_output_tokens"])
    assert result["plain_tokens_per_answer"] == round(with_schema["mean_output_tokens"])
    assert (without["requests"], without["errors"]) == (8, 0), without["error_messages"]
    assert without["mean_output_tokens"] == with_schema["mean_output_tokens"]
    for run in (with_schema, without):
        assert run["rps"] > 0 and run["output_tok_s"] > 0
        for dist in (run["ttft_ms"], run["itl_ms"]):
            assert all(_is_number(dist[k]) and dist[k] > 0 for k in ("p50", "p95", "p99"))
    assert all(_is_number(v) and v > 0 for k, v in result["ratio"].items() if k != "steady_output_tok_s")
    assert result["ratio"]["output_tok_s"] == round(with_schema["output_tok_s"] / without["output_tok_s"], 3)
    assert result["meets_target"] is (result["ratio"]["output_tok_s"] >= 0.9)

    doc = {"meta": {"date": "2026-12-03", "commit": "abc1234", "device": "cpu"}}
    doc["phases"] = {"serve": {"structured_c32": result}}
    doc["comparison"] = comparisons(doc)
    figures = doc["comparison"]["structured"]
    assert (
        figures["with_over_without"] == result["ratio"]["output_tok_s"] and figures["valid_fraction"] == 1.0
    )
    assert "8/8 answers valid (jsonschema)" in table(doc)


@pytest.mark.slow
def test_grammar_compile_reports_new_cached_and_no_schema(tiny_triton) -> None:
    result = _run(  # through Triton's HTTP generate_stream: the harness's fallback target
        "triton-http",
        tiny_triton.http_url,
        lambda target: structured.compile_ttft(target, SIZE, repetitions=2, seed=9),
    )
    assert "error" not in result, result
    for case in ("new_schema", "same_schema", "no_schema"):
        assert (result[case]["requests"], result[case]["errors"]) == (2, 0), result[case]["error_messages"]
        assert _is_number(result[case]["ttft_ms"]["p50"]) and result[case]["ttft_ms"]["p50"] > 0
    assert _is_number(result["first_guided_ttft_ms"]) and result["first_guided_ttft_ms"] > 0
    for key in ("compile_ms", "cached_schema_ms", "server_compile_ms", "server_cached_schema_ms"):
        assert _is_number(result[key]), key  # a difference of two TTFTs: either sign on a busy CPU
    doc = {"meta": {"date": "2026-12-03", "commit": "abc1234", "device": "cpu"}}
    doc["phases"] = {"serve": {"grammar_compile": result}}
    doc["comparison"] = comparisons(doc)
    assert doc["comparison"]["structured"]["compile_ttft_ms"] == result["compile_ms"]
    assert f"compiling adds {result['compile_ms']} ms" in table(doc)


@pytest.mark.slow
def test_guided_sub_phases_are_skipped_with_the_reason_without_xgrammar(
    tiny_triton, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` raises ImportError
    harness = Harness(tmp_path, budget_s=600, commit="abc1234")
    record: dict = {}
    only = {"grammar_compile", "structured_c32"}
    try:
        asyncio.run(serve_phases(harness, tiny_triton.grpc_url, "triton", record, None, only))
    finally:
        harness.log_file.close()
    for name in only:
        assert record[name]["skipped"].startswith("xgrammar cannot be imported (ModuleNotFoundError"), record[
            name
        ]
        assert "install .whl/llm/*.whl" in record[name]["skipped"]
    doc = {"meta": {"date": "2026-12-03", "commit": "abc1234"}, "phases": {"serve": record}}
    doc["comparison"] = comparisons(doc)
    assert "structured_c32: xgrammar cannot be imported" in table(doc)
    assert doc["comparison"]["structured"]["meets_target"] is None


def test_a_guided_request_cannot_ask_for_min_tokens() -> None:
    with pytest.raises(ValueError, match="^ignore_eos: must be False with guide_type"):
        RequestParams(guide_type="json_schema", guide="{}")


def test_schema_variants_are_new_schemas_of_the_same_shape() -> None:
    variant = structured.invoice_schema("ab12")
    assert variant["required"][-1] == "reference_ab12" and "reference_ab12" in variant["properties"]
    assert "reference_ab12" not in structured.INVOICE_SCHEMA["properties"]
    assert structured.invoice_schema() == structured.INVOICE_SCHEMA


def _largest_invoice() -> dict:
    return {
        "invoice_number": "ABC-12345678",
        "issue_date": "2099-12-31",
        "vendor": "供应商" * 10 + "AB",
        "currency": "CNY",
        "line_items": [{"description": "x" * 24, "quantity": 999, "unit_price": 99999.999999}] * 3,
        "total": 1000000,
        "status": "disputed",
        "vat_included": False,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, None),
        ({"currency": "BTC"}, "$.currency: 'BTC' is not one of"),
        ({"invoice_number": "AB-12"}, "$.invoice_number: 'AB-12' does not match"),
        ({"issue_date": "2024-13-01"}, "$.issue_date: '2024-13-01' does not match"),
        ({"vendor": ""}, "$.vendor: 0 characters, outside minLength/maxLength"),
        ({"total": 1000000.5}, "$.total: 1000000.5 breaks maximum 1000000"),
        ({"total": "12.50"}, '$.total: "12.50" is not of type number'),
        ({"vat_included": 1}, "$.vat_included: 1 is not of type boolean"),
        ({"line_items": []}, "$.line_items: 0 items, outside minItems/maxItems"),
        ({"line_items": [{"description": "a", "quantity": 1.5, "unit_price": 1}]}, "$.line_items[0].quantity: 1.5 is not of type integer"),
        ({"line_items": [{"description": "a", "quantity": True, "unit_price": 1}]}, "$.line_items[0].quantity: true is not of type integer"),
        ({"line_items": [{"description": "a", "quantity": 1}]}, "$.line_items[0]: 'unit_price' is missing"),
        ({"note": "extra"}, "$: 'note' is not allowed"),
    ],
)  # fmt: skip
def test_the_builtin_check_agrees_with_jsonschema(change: dict, message: str | None) -> None:
    """The validator the GPU machine uses (it has no jsonschema) accepts and refuses what jsonschema does."""
    invoice = {**_largest_invoice(), **change}
    errors = structured.schema_errors(invoice, structured.INVOICE_SCHEMA)
    is_valid = jsonschema.Draft202012Validator(structured.INVOICE_SCHEMA).is_valid(invoice)
    assert (errors == []) is is_valid
    if message is None:
        assert errors == []
    else:
        assert len(errors) == 1 and errors[0].startswith(message), errors


def test_llm_wheels_are_left_alone_where_xgrammar_is_installed(tmp_path: Path) -> None:
    from importlib.metadata import version

    from benchmarks.gpu_harness import install_llm_wheels

    assert (
        install_llm_wheels(tmp_path / "no_wheels_here")
        == f"xgrammar {version('xgrammar')}, pyspng {version('pyspng')} already in site-packages"
    )
