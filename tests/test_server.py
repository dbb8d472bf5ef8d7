"""edge-run serve's HTTP server: the official openai client against it (streaming and not), concurrency,
and every bad request answered with a 4xx and a one-line reason while the server keeps serving."""
from __future__ import annotations

import http.client
import json
import threading

import pytest

import edge_runtime
from edge_runtime.memory import budget
from edge_runtime.server import REQUEST_BYTES, make_server, queue_limit

openai = pytest.importorskip("openai")  # the test extra

QUESTION = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module", params=["numpy", "ort"])
def served(request, tiny_bundle):
    model = edge_runtime.load(tiny_bundle("tiny:llama", "int4"), backend=request.param, threads=1, context=256)
    server = make_server(model, port=0, max_tokens=16, max_body=4096)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address
    yield model, server, host, port
    server.shutdown()
    server.server_close()


def client(host, port):
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0)


def raw(host, port, body: bytes, headers=None, method="POST", path="/v1/chat/completions"):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def test_openai_client_streams_the_same_text_as_generate(served):
    model, _, host, port = served
    want = model.generate(QUESTION, max_new_tokens=12)
    c = client(host, port)
    chunks = list(c.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0,
                                            stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want.text
    assert chunks[-1].choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    whole = c.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == want.text
    assert whole.usage.completion_tokens == len(want.token_ids)
    assert [m.id for m in c.models.list().data] == [server_name(served)]


def server_name(served):
    return served[1].service.name


def test_eight_concurrent_clients_are_all_answered_correctly(served):
    model, _, host, port = served
    questions = [[{"role": "user", "content": f"question number {i} about cats"}] for i in range(8)]
    want = [model.generate(q, max_new_tokens=10).text for q in questions]
    got: list = [None] * 8

    def ask(i):
        r = client(host, port).chat.completions.create(model="tiny", messages=questions[i], max_tokens=10,
                                                        temperature=0, stream=bool(i % 2))
        got[i] = (r.choices[0].message.content if not i % 2
                  else "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_bad_requests_get_4xx_with_one_line_and_the_server_keeps_serving(served):
    model, _, host, port = served
    long_prompt = [{"role": "user", "content": "cat dog " * 150}]  # > context 256 with the answer
    cases = [
        (b"{not json", 400, "malformed JSON"),
        (json.dumps({"messages": QUESTION, "frobnicate": 1}).encode(), 400, "unknown field(s): frobnicate"),
        (json.dumps({"messages": "hi"}).encode(), 400, "messages must be"),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
        (json.dumps({"messages": QUESTION, "max_tokens": -3}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": QUESTION, "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({"messages": long_prompt, "max_tokens": 100}).encode(), 400, "context"),
        (b"x" * 5000, 413, "exceeds the limit"),
    ]
    for body, status, reason in cases:
        code, data = raw(host, port, body)
        message = json.loads(data)["error"]["message"]
        assert (code, reason in message, "\n" in message) == (status, True, False), (body[:40], code, message)
    assert raw(host, port, b"", method="GET", path="/nowhere")[0] == 404
    with pytest.raises(openai.BadRequestError):
        client(host, port).chat.completions.create(model="tiny", messages=long_prompt, max_tokens=100)
    ok = client(host, port).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0)
    assert ok.choices[0].message.content == model.generate(QUESTION, max_new_tokens=12).text


def test_sessions_by_id_and_a_full_queue_gets_503(served):
    model, server, host, port = served
    assert raw(host, port, b"", method="GET", path="/health")[0] == 200
    c = client(host, port)
    first = c.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0,
                                      extra_body={"session_id": "s1"})
    second = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "and then"}],
                                       max_tokens=8, temperature=0, extra_body={"session_id": "s1"})
    history = QUESTION + [{"role": "assistant", "content": first.choices[0].message.content},
                          {"role": "user", "content": "and then"}]
    assert second.choices[0].message.content == model.generate(history, max_new_tokens=8).text
    service, taken = server.service, 0
    service._busy.add("s2")  # a turn of s2 in flight: another request on s2 must wait its turn
    code, data = raw(host, port, json.dumps({"messages": QUESTION, "session_id": "s2"}).encode())
    service._busy.discard("s2")
    assert code == 409 and "answering another request" in json.loads(data)["error"]["message"]
    for _ in range(service.limit):  # every slot taken, as by requests waiting for the model
        assert service._slots.acquire(timeout=30)  # (a finished request frees its slot just after replying)
        taken += 1
    try:
        code, data = raw(host, port, json.dumps({"messages": QUESTION}).encode())
        assert code == 503 and "server busy" in json.loads(data)["error"]["message"]
    finally:
        for _ in range(taken):
            service.done()
    assert raw(host, port, json.dumps({"messages": QUESTION, "max_tokens": 2}).encode())[0] == 200


def test_queue_bound_follows_the_memory_plan(served):
    model = served[0]
    b = model.backend
    plan = budget.plan_session(model.bundle, model.context, backend=b.name, kv_dtype=b.kv_dtype,
                               prefill_chunk=model.prefill_chunk, threads=b.threads)
    assert queue_limit(model, None, 16) == 16
    assert queue_limit(model, plan.total + 3 * REQUEST_BYTES + 1, 16) == 3
    assert queue_limit(model, plan.total + 100 * REQUEST_BYTES, 16) == 16
    assert queue_limit(model, plan.total, 16) == 1  # the plan itself fits: one request at a time
