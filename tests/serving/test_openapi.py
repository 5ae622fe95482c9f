"""``GET /openapi.json`` (issue 16) describes what the API really accepts and returns.

The document is valid OpenAPI 3.1; its request schema is ``ChatRequest``'s own JSON
schema (a protocol change shows up here); requests generated from that schema and sent
to the real server get a documented status, never a 5xx, and every JSON body conforms
to the schema the document gives for that status — on scripted answers over the real
Q4_K_M tokenizer and template for the fuzz, and on the real model for a few requests.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi

from quantfleet.agent.backends import Backend
from quantfleet.agent.serving.openapi import document
from quantfleet.agent.serving.protocol import ChatRequest
from quantfleet.agent.serving.routing import ModelSet

from .conftest import Running, ScriptedBackend, ServeFactory, make_config, start_app

CHAT = "/v1/chat/completions"
TOOL = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = '{"name": "weather", "arguments": {"city": "Paris"}}'


def fetch_document(agent: Running) -> dict[str, Any]:
    resp = httpx.get(agent.url + "/openapi.json", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    doc: dict[str, Any] = resp.json()
    return doc


def schema_of(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A schema of the document as a standalone JSON Schema (its components as $defs)."""
    text = json.dumps({**schema, "$defs": doc["components"]["schemas"]})
    standalone: dict[str, Any] = json.loads(text.replace("#/components/schemas/", "#/$defs/"))
    return standalone


def conforms(doc: dict[str, Any], path: str, method: str, resp: httpx.Response) -> None:
    """The status is documented for the operation, and the body is what it says."""
    responses = doc["paths"][path][method]["responses"]
    status = str(resp.status_code)
    assert status in responses, (status, resp.text[:300])
    documented = responses[status]
    for header in documented.get("headers", {}):
        if header == "Retry-After" or header == "X-Request-Id":
            assert header in resp.headers, (status, header)
    media = resp.headers.get("content-type", "").split(";")[0]
    content = documented.get("content", {})
    assert media in content, (status, media, list(content))
    if media == "application/json":
        jsonschema.validate(resp.json(), schema_of(doc, content[media]["schema"]),
                            cls=jsonschema.Draft202012Validator)
    elif media == "text/event-stream":
        # Each event is a documented chunk, then `[DONE]` — or an error event, last.
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events, resp.text[-300:]
        done = events[-1] == "[DONE]"
        event_schema = schema_of(doc, content[media]["x-quantfleet-event"])
        for event in events[:-1] if done else events:
            jsonschema.validate(json.loads(event), event_schema,
                                cls=jsonschema.Draft202012Validator)
        assert done or "error" in json.loads(events[-1]), events[-1]


@pytest.fixture(scope="module")
def scripted(ladder_dir: Any, loaded: dict[str, Backend]) -> Iterator[Running]:
    """The real tokenizer and template with instant answers: prose, or a tool call."""
    config = make_config(ladder_dir, models={"fallback": ""},
                         budgets={"max_tokens_ceiling": 8, "default_max_tokens": 8},
                         listen={"max_body_bytes": 65536})
    backend = ScriptedBackend(loaded["Q4_K_M"], ["Hi there.", CALL])
    running = start_app(config, ModelSet.from_backends(config, {"Q4_K_M": backend}))
    yield running
    running.stop()


def test_the_document_is_valid_openapi_and_has_no_auth_when_none_is_set(
        scripted: Running) -> None:
    doc = fetch_document(scripted)
    validate_openapi(doc)  # raises on an invalid document
    assert doc["openapi"].startswith("3.1")
    assert "securitySchemes" not in doc["components"]
    assert "401" not in doc["paths"][CHAT]["post"]["responses"]
    # No HTML documentation pages (they would load their scripts from a CDN).
    assert httpx.get(scripted.url + "/docs").status_code == 404
    assert httpx.get(scripted.url + "/redoc").status_code == 404


def test_with_a_token_the_bearer_scheme_is_documented_and_holds(
        serve_app: ServeFactory, loaded: dict[str, Backend],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTFLEET_AGENT_TOKEN", "s3cret")
    agent = serve_app({"Q4_K_M": ScriptedBackend(loaded["Q4_K_M"], ["Hi."])},
                      models={"fallback": ""})
    doc = fetch_document(agent)
    validate_openapi(doc)
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"][
            "securitySchemes"]["bearer"]["description"]}
    for path, method in ((CHAT, "post"), ("/v1/models", "get")):
        assert doc["paths"][path][method]["security"] == [{"bearer": []}]
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = httpx.post(agent.url + CHAT, json=body, headers=headers, timeout=30)
        assert resp.status_code == 401
        conforms(doc, CHAT, "post", resp)
        conforms(doc, "/v1/models", "get", httpx.get(agent.url + "/v1/models", headers=headers))
    ok = {"Authorization": "Bearer s3cret"}
    conforms(doc, CHAT, "post", httpx.post(agent.url + CHAT, json=body, headers=ok, timeout=30))
    conforms(doc, "/v1/models", "get", httpx.get(agent.url + "/v1/models", headers=ok))


def test_the_request_schema_is_chat_requests_own(scripted: Running) -> None:
    """Drift: the documented body is pydantic's schema of the model the handler parses
    with, and every route the app serves is documented (and nothing else)."""
    doc = fetch_document(scripted)
    op = doc["paths"][CHAT]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatRequest"}
    own = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = own.pop("$defs")
    schemas = doc["components"]["schemas"]
    assert schemas["ChatRequest"] == own
    assert {k: schemas[k] for k in defs} == defs
    assert "quantfleet" in schemas["ChatRequest"]["properties"]
    assert doc == document(auth=False)
    app = scripted.server.config.app
    served = {(r.path, m.lower()) for r in app.routes  # type: ignore[attr-defined]
              for m in getattr(r, "methods", ()) if m != "HEAD"}
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented


def test_the_other_endpoints_conform(scripted: Running) -> None:
    doc = fetch_document(scripted)
    for path in ("/v1/models", "/healthz", "/metrics", "/openapi.json"):
        conforms(doc, path, "get", httpx.get(scripted.url + path, timeout=10))
    # An unknown route is the documented not_found error body.
    conforms(doc, "/healthz", "get", httpx.get(scripted.url + "/nope", timeout=10))
    too_big = httpx.post(scripted.url + CHAT, content=b" " * 70_000, timeout=10)
    assert too_big.status_code == 413
    conforms(doc, CHAT, "post", too_big)
    unknown = httpx.post(scripted.url + CHAT, timeout=10, json={
        "model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert unknown.status_code == 404
    conforms(doc, CHAT, "post", unknown)


# A free-form object in the schema (a tool's parameters, a response format's schema):
# mostly JSON Schemas, so that such requests are also answered, sometimes anything.
SCHEMAS = [{"type": "object", "properties": {"city": {"type": "string"}}},
           {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}},
            "required": ["n"]}, {"type": "string", "enum": ["a", "b"]}, {}]
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                                allow_infinity=False) | st.text(
    max_size=6)
free_objects = st.sampled_from(SCHEMAS) | st.dictionaries(st.text(max_size=6), scalars,
                                                          max_size=3)


def strategy(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of the JSON Schema keywords pydantic emits for ChatRequest (hypothesis-
    jsonschema 0.23 does not run on this hypothesis)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: strategy(defs[name], defs))
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([strategy(s, defs) for s in schema.get("anyOf", schema.get("oneOf"))])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        if "properties" not in schema:
            return free_objects if schema.get("additionalProperties") is True else (
                st.dictionaries(st.text(max_size=6), strategy(schema["additionalProperties"],
                                                              defs), max_size=3))
        props = {k: strategy(v, defs) for k, v in schema["properties"].items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                     optional={k: v for k, v in props.items()
                                               if k not in required})
    if kind == "array":
        return st.lists(strategy(schema["items"], defs), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 4), 4))
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0),
                       max_size=min(schema.get("maxLength", 24), 24))
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -(2**70) - 1) + 1)
        high = schema.get("maximum", schema.get("exclusiveMaximum", 2**70 + 1) - 1)
        return st.integers(low, high)
    if kind == "number":
        return st.floats(schema.get("minimum", schema.get("exclusiveMinimum")),
                         schema.get("maximum", schema.get("exclusiveMaximum")),
                         exclude_min="exclusiveMinimum" in schema,
                         exclude_max="exclusiveMaximum" in schema,
                         allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    raise AssertionError(f"no strategy for {schema}")


def _request_strategy() -> st.SearchStrategy[Any]:
    doc = document(auth=False)
    schemas = doc["components"]["schemas"]
    return strategy(schemas["ChatRequest"], schemas)


_DOC = document(auth=False)  # what the server serves (test_the_request_schema_is_...)
STATUSES: list[int] = []


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
@given(body=_request_strategy())
@example(body={"messages": [{"role": "user", "content": "Hi"}]})
@example(body={"messages": [{"role": "user", "content": "Hi"}], "stream": True,
               "stream_options": {"include_usage": True}})
@example(body={"messages": [{"role": "user", "content": "Hi"}], "tools": [TOOL]})
@example(body={"messages": [{"role": "user", "content": "Hi"}], "tools": [TOOL],
               "tool_choice": "required", "stream": True})
@example(body={"messages": [{"role": "user", "content": "Hi"}],
               "response_format": {"type": "json_object"}})
def test_requests_from_the_schema_get_documented_answers(scripted: Running,
                                                         body: dict[str, Any]) -> None:
    resp = httpx.post(scripted.url + CHAT, json=body, timeout=60)
    STATUSES.append(resp.status_code)
    own_deadline = isinstance(body.get("quantfleet"), dict) and \
        body["quantfleet"].get("deadline_s") is not None
    if resp.status_code in (503, 504) and own_deadline:
        # The client's own deadline (quantfleet.deadline_s: any positive number, 5e-324
        # included) passed while queued or generating: the documented answer, not a fault.
        assert resp.json()["error"]["code"] == "deadline", resp.text[:500]
    else:
        assert resp.status_code < 500, (resp.status_code, resp.text[:500], body)
    conforms(_DOC, CHAT, "post", resp)


def test_a_deadline_too_short_to_meet_is_the_documented_504(scripted: Running) -> None:
    """What the fuzz found: a client deadline of 5e-324 s is admitted (nothing was
    queued), cut after the first token, and answered 504 ``deadline`` as documented."""
    body = {"messages": [{"role": "user", "content": "Hi"}],
            "quantfleet": {"deadline_s": 5e-324}}
    resp = httpx.post(scripted.url + CHAT, json=body, timeout=60)
    assert resp.status_code in (503, 504), resp.text
    assert resp.json()["error"]["code"] == "deadline"
    conforms(_DOC, CHAT, "post", resp)


def test_the_fuzz_reached_answers_and_refusals() -> None:
    # Both kinds: a fuzz that only ever got 400s would not have checked the answers.
    assert 200 in STATUSES and 400 in STATUSES, sorted(set(STATUSES))


@pytest.fixture(scope="module")
def real(ladder_dir: Any, loaded: dict[str, Backend]) -> Iterator[Running]:
    config = make_config(ladder_dir, models={"fallback": "", "workers_per_model": 1},
                         budgets={"max_tokens_ceiling": 12, "default_max_tokens": 12})
    running = start_app(config, ModelSet.from_backends(config, {"Q4_K_M": loaded["Q4_K_M"]}))
    yield running
    running.stop()


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "Name a colour."}], "seed": 1},
    {"messages": [{"role": "user", "content": "Count to three."}], "stream": True,
     "stream_options": {"include_usage": True}},
    {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [TOOL],
     "tool_choice": "required"},
    {"messages": [{"role": "user", "content": "A person?"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": {
            "type": "object", "properties": {"name": {"type": "string"}},
            "required": ["name"]}}}},
], ids=["prose", "stream", "tool call", "json schema"])
def test_real_model_answers_conform(real: Running, body: dict[str, Any]) -> None:
    resp = httpx.post(real.url + CHAT, json=body, timeout=120)
    assert resp.status_code == 200, resp.text[:300]
    conforms(_DOC, CHAT, "post", resp)


def test_failures_conform(serve_app: ServeFactory, ladder_dir: Any,
                          loaded: dict[str, Backend]) -> None:
    """A runtime failure (500; mid-stream, an error event) and a model still loading (503
    on both routes, with Retry-After) answer as documented."""
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    failing = serve_app({"Q4_K_M": ScriptedBackend(loaded["Q4_K_M"], ["so <FAIL>"])},
                        models={"fallback": ""})
    resp = httpx.post(failing.url + CHAT, json=body, timeout=30)
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "backend_error"
    conforms(_DOC, CHAT, "post", resp)
    streamed = httpx.post(failing.url + CHAT, json={**body, "stream": True}, timeout=30)
    assert '"backend_error"' in streamed.text
    conforms(_DOC, CHAT, "post", streamed)

    config = make_config(ladder_dir, models={"fallback": ""})
    release = threading.Event()

    def load() -> ModelSet:
        release.wait(30)
        return ModelSet.from_backends(config, {"Q4_K_M": loaded["Q4_K_M"]})

    loading = start_app(config, load)
    try:
        health = httpx.get(loading.url + "/healthz", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        conforms(_DOC, "/healthz", "get", health)
        refused = httpx.post(loading.url + CHAT, json=body, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        conforms(_DOC, CHAT, "post", refused)
    finally:
        release.set()
        loading.stop()
