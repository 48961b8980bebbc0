"""Guided decoding and logprobs on the tiny random checkpoint: random weights are the hardest case for a
grammar (the model never wants the structure), so every sampled answer must still parse and validate."""

from __future__ import annotations

import json
import re
import shutil
import threading

import pytest
import torch

from engine.llm_engine import GenerationRequest, LLMEngine
from engine.sample.sampler import Sampler, SamplingParams
from engine.sample.structured import Guide

# Both are in requirements/cpu.txt; the GPU machine has neither unless they are carried as wheels.
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

INVOICE = {
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "total": {"type": "number"},
        "currency": {"enum": ["EUR", "USD", "人民币"]},
        "paid": {"type": "boolean"},
    },
    "required": ["invoice_number", "total", "currency", "paid"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "pattern": "^[一-龥]{1,6}$"},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"enum": ["红色", "blue", "绿"]}, "qty": {"type": "integer"}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
            "maxItems": 3,
        },
    },
    "required": ["customer", "items"],
    "additionalProperties": False,
}
CLAUSE = {
    "type": "object",
    "properties": {
        "present": {"enum": ["yes", "no"]},
        "quote": {"type": "string", "maxLength": 12},
        "scores": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 4},
    },
    "required": ["present", "quote", "scores"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine_dir(tiny_checkpoint, tmp_path_factory):
    engine_dir = tmp_path_factory.mktemp("structured") / "engine"
    shutil.copytree(tiny_checkpoint, engine_dir)
    engine = {"block_size": 4, "num_kv_blocks": 2048, "max_model_len": 1024, "dtype": "float32"}
    (engine_dir / "engine_config.json").write_text(json.dumps({"engine": engine}))
    return engine_dir


@pytest.fixture(scope="module")
def engine(engine_dir) -> LLMEngine:
    return LLMEngine.from_engine_dir(engine_dir, max_num_seqs=16)


def run(ex: LLMEngine, reqs: list[GenerationRequest]) -> dict[str, tuple[list[int], str, str]]:
    """request id -> (tokens, text, finish_reason), all requests in one batch."""
    for req in reqs:
        ex.add_request(req)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    texts = dict.fromkeys(tokens, "")
    reasons: dict[str, str] = {}
    while ex.has_unfinished():
        for out in ex.step():
            tokens[out.request_id] += out.new_token_ids
            texts[out.request_id] += out.text + out.reasoning
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
    return {rid: (tokens[rid], texts[rid], reasons[rid]) for rid in tokens}


@pytest.mark.parametrize("schema", [INVOICE, NESTED, CLAUSE], ids=["invoice", "nested", "clause"])
def test_every_sampled_answer_validates_against_its_schema(engine, schema):
    guide = Guide("json_schema", json.dumps(schema))
    reqs = [
        GenerationRequest(
            f"r{seed}", [5, 6, 7, 8 + seed], SamplingParams(max_tokens=600, seed=seed), guide=guide
        )
        for seed in range(8)
    ]
    for rid, (_, text, reason) in run(engine, reqs).items():
        assert reason == "stop", (rid, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_guide_gives_json_objects_and_greedy_too(engine):
    reqs = [
        GenerationRequest("sampled", [9, 10], SamplingParams(max_tokens=600, seed=3), guide=Guide("json")),
        GenerationRequest(
            "greedy", [9, 10], SamplingParams(max_tokens=600, temperature=0.0), guide=Guide("json")
        ),
        GenerationRequest("free", [9, 10], SamplingParams(max_tokens=8, temperature=0.0)),
    ]
    results = run(engine, reqs)
    for rid in ("sampled", "greedy"):
        tokens, text, reason = results[rid]
        assert reason == "stop", text
        assert isinstance(json.loads(text), dict)
    free_tokens, _, _ = results["free"]
    alone = run(engine, [GenerationRequest("alone", [9, 10], SamplingParams(max_tokens=8, temperature=0.0))])
    assert free_tokens == alone["alone"][0]  # a guided neighbour changes nothing for an unguided request


def test_regex_guide(engine):
    guide = Guide("regex", "(yes|no): [0-9]{2}")
    reqs = [
        GenerationRequest(f"r{seed}", [3, 4], SamplingParams(max_tokens=40, seed=seed), guide=guide)
        for seed in range(6)
    ]
    for _, text, reason in run(engine, reqs).values():
        assert reason == "stop"
        assert re.fullmatch("(yes|no): [0-9]{2}", text), text


def test_min_tokens_is_refused_with_a_guide(engine):
    with pytest.raises(ValueError, match=r"^min_tokens: 3 must be 0 with guided_decoding_guide"):
        engine.add_request(
            GenerationRequest("m", [1], SamplingParams(max_tokens=8, min_tokens=3), guide=Guide("json"))
        )


def test_a_schema_is_compiled_once(engine):
    compiler = engine.grammar_compiler()
    schema = json.dumps({"type": "object", "properties": {"once": {"type": "integer"}}, "required": ["once"]})
    before = compiler.num_compiled
    run(
        engine,
        [
            GenerationRequest(
                f"c{i}", [1, 2], SamplingParams(max_tokens=40, seed=i), guide=Guide("json_schema", schema)
            )
            for i in range(3)
        ],
    )
    assert compiler.num_compiled == before + 1


@pytest.mark.parametrize(
    ("guide", "message"),
    [
        (Guide("json_schema", "{not json"), "guided_decoding_guide: not valid JSON"),
        (
            Guide("json_schema", "[1, 2]"),
            "guided_decoding_guide: invalid json_schema (a JSON schema is an object",
        ),
        (Guide("json_schema", '{"type": "strnig"}'), "guided_decoding_guide: invalid json_schema"),
        (Guide("regex", "(unclosed"), "guided_decoding_guide: invalid regex"),
        (Guide("ebnf_grammar", "root ::= missing_rule"), "guided_decoding_guide: invalid ebnf_grammar"),
        (Guide("xml", "<a/>"), "guided_decoding_guide_type: 'xml' must be one of json, json_schema, regex"),
        (Guide("regex", ""), "guided_decoding_guide: empty; a regex guide needs a value"),
    ],
)
def test_bad_guides_are_rejected_naming_the_field(engine, guide, message):
    """By the engine (which compiles the guide), and with the same message by `check_guide` (which only
    parses it: what the engine process's parent runs before the request goes to its child)."""
    from engine.sample.structured import check_guide

    with pytest.raises(ValueError) as info:
        engine.add_request(GenerationRequest("bad", [1, 2], SamplingParams(max_tokens=4), guide=guide))
    assert str(info.value).startswith(message), str(info.value)
    assert not engine.has_unfinished()
    compiled = engine.grammar_compiler().num_compiled
    with pytest.raises(ValueError) as parsed:
        check_guide(guide)
    assert str(parsed.value) == str(info.value)
    check_guide(Guide("json_schema", json.dumps(INVOICE)))
    assert engine.grammar_compiler().num_compiled == compiled  # parsing compiles nothing


def test_warmup_makes_the_grammar_compiler_beside_it(engine_dir):
    """The first guided request does not wait for the compiler's view of the vocabulary: `warmup` makes it
    on a thread of its own."""
    ex = LLMEngine.from_engine_dir(engine_dir)
    assert ex.input_processor._grammar_compiler is None
    ex.warmup()
    for thread in threading.enumerate():
        if thread.name == "glm-grammar-init":
            thread.join(60)
    assert ex.input_processor._grammar_compiler is not None
    assert ex.grammar_compiler().num_compiled == 0


def test_logprob_sequences_never_run_ahead_and_guided_ones_wait_for_their_last_token(engine):
    engine.add_request(GenerationRequest("g", [1, 2], SamplingParams(max_tokens=4), guide=Guide("json")))
    engine.add_request(GenerationRequest("l", [1, 2], SamplingParams(max_tokens=4, logprobs=0)))
    engine.add_request(GenerationRequest("p", [1, 2], SamplingParams(max_tokens=4)))
    seqs = {rid: engine._seqs[rid] for rid in ("g", "l", "p")}
    assert [Sampler.can_run_ahead(seqs[rid]) for rid in ("g", "l", "p")] == [True, False, True]
    assert [Sampler.needs_last_token(seqs[rid]) for rid in ("g", "l", "p")] == [True, False, False]
    logits = torch.zeros(1, engine.model_config.vocab_size)
    with pytest.raises(ValueError, match="needs its last token on the host"):
        engine.runner.sampler.sample_ids(logits, [seqs["g"]], ahead=1)
    while engine.has_unfinished():
        engine.step()


def test_guided_steps_run_ahead_and_give_the_same_tokens(engine, engine_dir):
    """With decode steps launched ahead of the host, a batch with grammars runs ahead too: each step's
    forward is launched before the previous tokens are read, and sampled once they are (masks fed those
    tokens and filled meanwhile, on the stepping thread); the tokens reach the sequences after the sampling
    is launched. Every token equals the synchronous engine's, and every guided answer validates."""
    from tests.engine.runner.test_cuda_graphs import _EagerDecodeGraphs

    ahead = LLMEngine.from_engine_dir(engine_dir, max_num_seqs=16)
    runner = ahead.runner
    runner.graphs = _EagerDecodeGraphs(
        runner.model,
        runner.kv_caches,
        runner.block_size,
        max_num_seqs=16,
        max_num_blocks_per_seq=1024 // runner.block_size,
        scratch_block_id=runner.scratch_block_id,
    )
    launches, launch = [], runner.launch_decode

    def record_launch(seqs, previous=None, before_sample=None):
        # a launch that raises falls back to a synchronous step with the same tokens: count only those
        # that launched
        launched = launch(seqs, previous, before_sample)
        launches.append((previous is not None, before_sample is not None and launched is not None))
        return launched

    runner.launch_decode = record_launch
    masks = runner.sampler.masks
    prepared, prepare = [], masks.prepare
    masks.prepare = lambda *args: prepared.append(threading.current_thread()) or prepare(*args)
    # (number of output tokens in each guided sequence, ahead) when a prepared step is sampled: pending's
    # token is not in the sequence yet
    sampled_at, sample_ids = [], runner.sampler.sample_ids

    def record_sample(logits, seqs, ahead=0, prepared=None):
        if prepared is not None:
            sampled_at.append(ahead)
        return sample_ids(logits, seqs, ahead, prepared)

    runner.sampler.sample_ids = record_sample

    def requests() -> list[GenerationRequest]:
        schemas = [INVOICE, NESTED, CLAUSE]
        return [
            *(
                GenerationRequest(
                    f"g{i}", [5, 6, 7 + i], SamplingParams(max_tokens=300, seed=i),
                    guide=Guide("json_schema", json.dumps(schemas[i % 3])),
                )
                for i in range(5)
            ),
            GenerationRequest("greedy", [9, 10], SamplingParams(max_tokens=300, temperature=0.0), guide=Guide("json")),
            GenerationRequest("free", [9, 10], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)),
            GenerationRequest("seeded", [11, 12], SamplingParams(max_tokens=30, seed=5, ignore_eos=True)),
        ]  # fmt: skip

    want = run(engine, requests())
    got = run(ahead, requests())
    assert got == want
    for rid, (_, text, reason) in got.items():
        if rid.startswith("g") and rid != "greedy":
            assert reason == "stop", (rid, text)
            jsonschema.validate(json.loads(text), [INVOICE, NESTED, CLAUSE][int(rid[1]) % 3])
    assert isinstance(json.loads(got["greedy"][1]), dict)
    assert sum(1 for previous, waited in launches if previous and waited) >= 10  # guided steps ran ahead
    # their masks were prepared on the stepping thread and sampled with pending's token still ahead
    assert len(prepared) >= 10 and all(t is threading.main_thread() for t in prepared)
    assert len(sampled_at) == len(prepared) and set(sampled_at) == {1}
    assert ahead.block_manager.num_used_blocks == 0


def test_logprobs_match_a_transformers_forward(engine, hf_model):
    prompt = [11, 12, 13, 14, 15]
    reqs = [
        GenerationRequest(
            "greedy", prompt, SamplingParams(max_tokens=12, temperature=0.0, logprobs=5, ignore_eos=True)
        ),
        GenerationRequest(
            "sampled",
            prompt,
            SamplingParams(max_tokens=12, seed=1, logprobs=20, ignore_eos=True, repetition_penalty=1.3),
        ),
        GenerationRequest("only", prompt, SamplingParams(max_tokens=12, seed=2, logprobs=0, ignore_eos=True)),
    ]
    logprobs: dict[str, list] = {r.request_id: [] for r in reqs}
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    for req in reqs:
        engine.add_request(req)
    while engine.has_unfinished():
        for out in engine.step():
            assert out.logprobs is not None and len(out.logprobs) == len(out.new_token_ids)
            logprobs[out.request_id] += out.logprobs
            tokens[out.request_id] += out.new_token_ids
    for req in reqs:
        ids = tokens[req.request_id]
        with torch.inference_mode():
            logits = hf_model(input_ids=torch.tensor([prompt + ids])).logits[0].float()
        expected = logits[len(prompt) - 1 : -1].log_softmax(dim=-1)  # [12, vocab]: the distribution of each
        k = req.sampling.logprobs
        assert len(logprobs[req.request_id]) == len(ids) == 12
        for i, (token_id, (logprob, top)) in enumerate(zip(ids, logprobs[req.request_id], strict=True)):
            assert abs(logprob - expected[i, token_id].item()) < 1e-4
            assert len(top) == k
            values, top_ids = expected[i].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
            assert torch.allclose(torch.tensor([v for _, v in top]), values, atol=1e-4)
            assert [t for t, _ in top] == top_ids.tolist()
        if req.request_id == "greedy":
            assert all(
                top[0][0] == token_id for token_id, (_, top) in zip(ids, logprobs["greedy"], strict=True)
            )


def test_no_logprobs_unless_asked(engine):
    out = run(engine, [GenerationRequest("n", [1, 2], SamplingParams(max_tokens=3, temperature=0.0))])
    assert out["n"][2] in ("stop", "length")
    engine.add_request(GenerationRequest("n2", [1, 2], SamplingParams(max_tokens=2, temperature=0.0)))
    while engine.has_unfinished():
        assert all(o.logprobs is None for o in engine.step())


def test_logprobs_is_validated():
    with pytest.raises(ValueError, match=r"^logprobs: 21 is out of range \(must be None or in \[0, 20\]\)"):
        SamplingParams(logprobs=21).validate()


@pytest.mark.gpu
def test_guided_steps_run_ahead_on_cuda_graphs(engine_dir):
    """On the GPU, guided decode steps replay CUDA graphs one step ahead (masks copied from pinned memory
    while the forward runs) and give the tokens of the same engine stepping eagerly and synchronously."""
    graphs = LLMEngine.from_engine_dir(engine_dir, max_num_seqs=16, device="cuda")
    eager = LLMEngine.from_engine_dir(engine_dir, max_num_seqs=16, device="cuda")
    eager.runner.graphs = eager.runner.prefill_graphs = None
    launches, launch = [], graphs.runner.launch_decode
    graphs.runner.launch_decode = lambda seqs, previous=None, before_sample=None: (
        launches.append(before_sample is not None) or launch(seqs, previous, before_sample)
    )

    def requests() -> list[GenerationRequest]:
        schemas = [INVOICE, NESTED, CLAUSE]
        return [
            *(
                GenerationRequest(
                    f"g{i}", [5, 6, 7 + i], SamplingParams(max_tokens=300, temperature=0.0),
                    guide=Guide("json_schema", json.dumps(schemas[i % 3])),
                )
                for i in range(6)
            ),
            GenerationRequest("free", [9, 10], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)),
        ]  # fmt: skip

    got, want = run(graphs, requests()), run(eager, requests())
    assert got == want
    for i in range(6):
        _, text, reason = got[f"g{i}"]
        # random weights may write a number's digits until max_tokens (the grammar allows any length):
        # such an answer is a valid prefix; a finished one validates
        assert reason in ("stop", "length"), text
        if reason == "stop":
            jsonschema.validate(json.loads(text), [INVOICE, NESTED, CLAUSE][i % 3])
    assert sum(launches) >= 10


def test_prepared_masks_equal_masks_filled_after_the_tokens(engine):
    """`GrammarMasks.prepare` (matchers fed the given tokens, then filled) gives the bitmask that
    feeding the same tokens and filling on the calling thread gives; a position that does not follow the
    matcher's is ignored; rows without a grammar allow every token; the ring reuses its buffers."""
    from engine.sample.structured import GrammarMasks, GrammarState

    compiled = engine.grammar_compiler().compile(Guide("json_schema", json.dumps(INVOICE)))
    tokenizer = engine.tokenizer
    text = '{"invoice_number": "INV-7", "total": 1'
    ids = tokenizer.encode(text).ids if hasattr(tokenizer, "encode") else tokenizer(text)["input_ids"]
    vocab_size = engine.model_config.vocab_size
    masks = GrammarMasks()
    buffers = None
    for cut in range(1, len(ids)):
        # rows 0 and 2 guided (a matcher each, in the same state), row 1 unguided
        ahead = [GrammarState(compiled), GrammarState(compiled)]
        here = [GrammarState(compiled), GrammarState(compiled)]
        for state in ahead:
            for position, token in enumerate(ids[: cut - 1]):
                state.accept_at(position, token)
            state.accept_at(cut + 5, ids[cut - 1])  # not its next position: ignored
            assert state.num_accepted == cut - 1
        for state in here:
            state.sync(ids[:cut])
        jobs = [(0, ahead[0], ids[cut - 1], cut - 1), (2, ahead[1], ids[cut - 1], cut - 1)]
        prepared = masks.prepare(3, vocab_size, jobs, pinned=False)
        assert [s.num_accepted for s in ahead + here] == [cut] * 4
        want = masks.fill(3, vocab_size, [0, 2], here, pinned=False)
        assert prepared.rows == want.rows == [0, 2]
        assert torch.equal(prepared.bitmask, want.bitmask)
        assert bool((prepared.bitmask[1] == -1).all())
        assert not bool((prepared.bitmask[0] == -1).all())  # the grammar forbids something
        buffers = buffers or [b.data_ptr() for b in masks.buffers]
        assert [b.data_ptr() for b in masks.buffers] == buffers  # no new buffers per step
    logits = torch.zeros(3, vocab_size)
    masks.apply(logits, want)
    assert bool(torch.isinf(logits[0]).any()) and not bool(torch.isinf(logits[1]).any())
