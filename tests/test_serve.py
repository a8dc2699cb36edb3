"""Batched generation and serving with the bundled model: the official openai client against
%mlx_serve on 2 pipeline ranks, real HTTP over loopback; generate_batch on pipeline and tensor
parallel ranks. Every reply is checked against the same prompt generated alone."""

from __future__ import annotations

import doctest
import hashlib
import hmac
import http.client
import json
import pickle
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import zmq
from conftest import ipython_shell, wait_for
from IPython.core.error import UsageError

from mlx_nb import Cluster, ClusterError, magics, openai_api
from mlx_nb.batch import generate_batch
from mlx_nb.generate import generate, load_model
from mlx_nb.rank import line
from mlx_nb.rank.line import NotebookEnd, RankEnd
from mlx_nb.rank.serve import Ready
from mlx_nb.rank.session import inbox
from mlx_nb.serve import serve

TOKENS = 8
QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "What is 2+2?",
    "Who wrote Hamlet?",
    "What is the largest ocean?",
    "Say hello in Spanish.",
    "What do bees make?",
    "What color is the sky?",
]
SYSTEM = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Who are you?"}]
STORY = [{"role": "user", "content": "Write a very long story about a lighthouse keeper and the sea."}]


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def alone(pipeline_pair) -> dict:
    """Each test prompt's greedy reply generated alone (``generate``), before anything serves."""
    prompts = {q: chat(q) for q in QUESTIONS} | {"system": SYSTEM, "no system": SYSTEM[1:]}
    return {key: generate(pipeline_pair, p, TOKENS, quiet=True).text for key, p in prompts.items()}


@pytest.fixture(scope="module")
def server(pipeline_pair, alone):
    """``%mlx_serve --port 0`` in the test shell, on the pipeline pair; stopped at the end of the module."""
    ip = shell()
    magics.use(pipeline_pair)
    try:
        ip.run_line_magic("mlx_serve", "--port 0")
        yield magics.instance().server
    finally:
        magics.instance().stop_server()
        magics.use(None)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="not-needed", max_retries=0, timeout=600)


def shell():
    """The test IPython shell with mlx_nb's magics."""
    ip = ipython_shell()
    if "mlx_nb" not in ip.extension_manager.loaded:
        ip.run_line_magic("load_ext", "mlx_nb")
    return ip


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """A raw POST over loopback (for bodies the openai client would never send)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


# ---------------------------------------------------------------- generate_batch
def test_a_batch_of_prompts_gives_each_prompt_its_answer_alone_on_a_pipeline(pipeline_pair, alone):
    texts = {}
    result = generate_batch(
        pipeline_pair,
        [chat(q) for q in QUESTIONS[:4]],
        TOKENS,
        on_text=lambda i, text: texts.setdefault(i, []).append(text),
    )
    assert result.texts == [alone[q] for q in QUESTIONS[:4]]
    assert "Paris" in result.texts[0]
    # each reply streamed in pieces, as its tokens came
    assert ["".join(texts[i]) for i in range(4)] == result.texts and max(len(t) for t in texts.values()) > 2
    assert result.tokens_per_second > 0 and all(r.finish_reason in ("stop", "length") for r in result.replies)


def test_the_batch_magic_answers_one_prompt_per_line(pipeline_pair, alone, capsys):
    ip = shell()
    magics.use(pipeline_pair)
    try:
        result = ip.run_cell_magic("mlx_batch", f"--max-tokens {TOKENS}", f"{QUESTIONS[0]}\n\n{QUESTIONS[2]}\n")
        assert result.texts == [alone[QUESTIONS[0]], alone[QUESTIONS[2]]]
        assert f"[0] {alone[QUESTIONS[0]]}" in capsys.readouterr().out  # each reply as it ended
        assert "2 prompts" in repr(result) and "Paris" in repr(result)
        with pytest.raises(UsageError, match="one prompt per line"):
            ip.run_cell_magic("mlx_batch", "", "\n  \n")
    finally:
        magics.use(None)


def test_seeded_sampling_repeats_and_differs_across_seeds(pipeline_pair):
    prompts = ["Once upon a time"] * 2
    first = generate_batch(pipeline_pair, prompts, TOKENS, temperature=1.0, seed=5, quiet=True).texts
    again = generate_batch(pipeline_pair, prompts, TOKENS, temperature=1.0, seed=5, quiet=True).texts
    assert first == again
    assert first[0] != first[1]  # prompt i draws with seed + i


# ---------------------------------------------------------------- the API
def test_models_lists_the_model_the_ranks_hold(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"] == [server.model.id]
    assert client.models.retrieve(server.model.id).owned_by == "mlx_nb"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_status_shows_requests_rates_and_first_token_and_counts_no_idle_seconds(server, client):
    from mlx_nb.serve import WINDOW

    # a burst after a pause: tokens/s is what the ranks made while they generated, so at least
    # what the client saw over its whole request (idle seconds in the window do not count)
    wait_for(lambda: server.status().tokens_per_second == 0, WINDOW + 10, "a window with no tokens")
    t0 = time.perf_counter()
    reply = client.completions.create(model=server.model.id, prompt="Hello", max_tokens=TOKENS)
    took = time.perf_counter() - t0
    status = shell().run_line_magic("mlx_serve", "status")
    assert status.state == "serving" and status.completed >= 1 and status.generated >= reply.usage.completion_tokens
    assert status.ttft_median > 0 and status.running == status.queued == 0
    assert status.tokens_per_second >= reply.usage.completion_tokens / took, (status, took)
    text = repr(status)
    assert "requests running / queued" in text and "tokens/s while generating" in text and server.url in text
    last = server.first_tokens[-1]  # the reply's first token in parts: each a real span of this one machine
    assert min(last.read, last.to_ranks, last.prefill, last.back) >= 0 and 0 < last.total <= took
    assert abs(last.total - server._ttfts[-1]) < 1e-6 and str(status.ttft_parts) in text
    assert "a direct line (rank 0 runs here)" in text  # the ranks are local: no ipyparallel relay
    # CPU ranks: prompts go as they come, 8 a pass (a GPU's would wait 50 ms for up to --max-batch)
    assert "up to 8 prompts a pass; arrivals while others generate go at the next step" in text


def test_a_chat_completion_is_the_answer_alone(client, server, alone):
    r = client.chat.completions.create(model=server.model.id, messages=chat(QUESTIONS[0]), max_tokens=TOKENS)
    assert r.choices[0].message.content == alone[QUESTIONS[0]]
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and 1 <= r.usage.completion_tokens <= TOKENS


def test_a_streamed_chat_completion_arrives_in_pieces_that_make_the_answer(client, server, alone):
    stream = client.chat.completions.create(
        model=server.model.id,
        messages=chat(QUESTIONS[1]),
        max_tokens=TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and "".join(pieces) == alone[QUESTIONS[1]]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= len(pieces)


def test_a_system_prompt_goes_through_the_chat_template(client, server, alone):
    r = client.chat.completions.create(model=server.model.id, messages=SYSTEM, max_tokens=TOKENS)
    assert r.choices[0].message.content == alone["system"] != alone["no system"]
    assert "Aye" in alone["system"]


def test_text_completions_streamed_and_not_agree(client, server):
    whole = client.completions.create(model=server.model.id, prompt="The capital of France is", max_tokens=TOKENS)
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=server.model.id, prompt="The capital of France is", max_tokens=TOKENS, stream=True
        )
    ]
    assert "".join(pieces) == whole.choices[0].text and "Paris" in whole.choices[0].text
    assert whole.object == "text_completion" and whole.usage.completion_tokens == TOKENS


def test_eight_concurrent_requests_each_get_their_answer_alone(client, server, alone):
    answers: dict[str, str] = {}

    def ask(q: str) -> None:
        r = client.chat.completions.create(model=server.model.id, messages=chat(q), max_tokens=TOKENS)
        answers[q] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert answers == {q: alone[q] for q in QUESTIONS}
    assert server.status().batch_max >= 4  # they ran together, not one after another


def test_rank_0_waits_for_the_requests_announced_and_for_those_close_behind():
    from mlx_nb.rank import serve as rank_serve
    from mlx_nb.rank.session import state

    def add(rid: int, more: int) -> dict:
        return {"serve": "s", "add": [{"id": rid}], "more": more}

    for message in (add(1, 1), add(2, 0)):  # two announced, both already there
        state.inbox.put(message)
    assert rank_serve.gathered(1, most=60) == [add(1, 1), add(2, 0)]

    late = threading.Timer(0.3, state.inbox.put, [add(3, 0)])  # one announced, still being tokenized
    late.start()
    t = time.monotonic()
    assert rank_serve.gathered(1, most=60) == [add(3, 0)]
    assert time.monotonic() - t < 30  # it came: the wait ended then, not at the 60 s bound
    late.join()

    state.inbox.put(add(4, 0))  # none announced: what follows within the gap still joins
    assert rank_serve.gathered(0) == [add(4, 0)]

    state.inbox.put(add(5, 0))  # a conversation's next turn (gap 0): what is there, no wait for more
    late = threading.Timer(0.5, state.inbox.put, [add(6, 0)])
    late.start()
    assert rank_serve.gathered(0, gap=0.0, most=60) == [add(5, 0)]
    late.join()
    assert rank_serve.gathered(0) == [add(6, 0)]


def test_a_reply_s_first_text_leaves_rank_0_at_the_step_that_made_it():
    """A streaming detokenizer holds a token's text until the next completes it (an emoji's bytes
    come in several tokens): the report that may wait for more steps must not hold the first text
    a client can show. This prompt's greedy reply starts with two tokens of no text."""
    from mlx_lm import load

    from mlx_nb.models import bundled_model
    from mlx_nb.rank.batch import Batch, Outbox, Plan, Request

    model, tokenizer = load(str(bundled_model()))
    prompt = tokenizer.apply_chat_template(chat("Write a smiley emoji."), add_generation_prompt=True)
    batch = Batch(model, tokenizer, None)
    sent: list[tuple[int, list]] = []  # (step, tokens) of each report
    outbox = Outbox(lambda tokens: sent.append((step, tokens)), every=3600)  # only what may not wait
    batch.apply(Plan(add=[Request(1, prompt, 6)]))
    made: list[tuple[int, str]] = []  # (step, text) of each token
    for step in range(1, 7):
        tokens = batch.step()
        made += [(step, t.text) for t in tokens]
        outbox.add(tokens)
    batch.close()
    assert made[0][1] == "" and made[1][1] == ""  # what makes this test one
    shown_at = next(step for step, text in made if text)
    assert [step for step, tokens in sent if any(t.text for t in tokens)][0] == shown_at
    assert "".join(t.text for _, tokens in sent for t in tokens) == "".join(text for _, text in made)


def test_a_burst_of_64_clients_connecting_at_once_is_answered(client, server):
    errors: list[str] = []
    start = threading.Barrier(64)

    def ask() -> None:
        start.wait()
        try:
            for _ in client.chat.completions.create(
                model=server.model.id, messages=chat("Hi"), max_tokens=2, stream=True
            ):
                pass
        except openai.APIError as e:
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=ask) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert errors == []


def test_a_client_that_disconnects_mid_stream_leaves_the_batch_while_another_goes_on(client, server, alone):
    before = server.status().cancelled
    other: dict[str, str] = {}
    story = client.chat.completions.create(model=server.model.id, messages=STORY, max_tokens=4000, stream=True)
    pieces = iter(story)
    wait_for(lambda: next(pieces).choices[0].delta.content, what="the story's first words")

    def ask() -> None:
        r = client.chat.completions.create(model=server.model.id, messages=chat(QUESTIONS[0]), max_tokens=TOKENS)
        other["text"] = r.choices[0].message.content

    asker = threading.Thread(target=ask)
    asker.start()
    wait_for(lambda: server.status().running == 2, what="both requests in the batch")
    story.close()  # the client goes away mid-stream
    asker.join(600)
    assert other["text"] == alone[QUESTIONS[0]]
    status = wait_for(lambda: (s := server.status()).batch == 0 and s, what="the ranks' batch to empty")
    assert status.cancelled == before + 1 and status.running == status.queued == 0


def test_stop_strings_end_the_reply_before_them(client, server):
    r = client.chat.completions.create(
        model=server.model.id, messages=chat(QUESTIONS[0]), max_tokens=TOKENS, stop=[" is"]
    )
    assert r.choices[0].message.content == "The capital of France" and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=server.model.id, prompt="One, two, three,", max_tokens=TOKENS, stop=",", stream=True
    )
    assert "," not in "".join(c.choices[0].text for c in streamed)


def test_a_seed_repeats_a_sampled_reply(client, server):
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model=server.model.id,
                prompt="Once upon a time",
                max_tokens=TOKENS,
                temperature=1.0,
                top_p=0.95,
                seed=seed,
            )
            .choices[0]
            .text
        )

    assert sample(11) == sample(11)


# ---------------------------------------------------------------- bad requests
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


@pytest.mark.parametrize(
    "path, body, status, match",
    [
        (CHAT, b"{not json", 400, "not valid JSON"),
        (CHAT, b"[1, 2]", 400, "must be a JSON object"),
        (CHAT, json.dumps({"messages": [{"role": "wizard", "content": "Hi"}]}).encode(), 400, "role is 'wizard'"),
        (
            CHAT,
            json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}).encode(),
            400,
            "max_tokens",
        ),
        (
            CHAT,
            json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]}).encode(),
            404,
            "does not exist",
        ),
        (
            CHAT,
            json.dumps({"messages": [{"role": "user", "content": "Hi"}], "temperature": -1}).encode(),
            400,
            "temperature",
        ),
        (TEXT, json.dumps({"prompt": [1, 2, 10**9]}).encode(), 400, "token ids must lie in"),
        (TEXT, json.dumps({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "up to 4"),
    ],
)
def test_a_bad_request_gets_an_openai_error_and_the_server_goes_on(server, client, path, body, status, match):
    got, error = post(server, path, body)
    assert got == status and match in error["error"]["message"]
    assert server._arriving == 0  # a refused body is not still on its way: a lone request would wait for it
    assert client.completions.create(model=server.model.id, prompt="Hi", max_tokens=1).choices[0].text is not None


def test_bad_requests_through_the_openai_client_raise_its_errors(client, server):
    def refused(error: type, call, **request) -> openai.APIStatusError:
        with pytest.raises(error) as raised:
            call(**request)
        return raised.value

    chat_call, text_call = client.chat.completions.create, client.completions.create
    e = refused(openai.NotFoundError, chat_call, model="gpt-4", messages=chat("Hi"), max_tokens=4)
    assert e.code == "model_not_found" and "serves 'SmolLM2-135M-Instruct'" in e.message
    e = refused(openai.BadRequestError, text_call, model=server.model.id, prompt="hello " * 9000, max_tokens=4)
    assert e.code == "context_length_exceeded" and "maximum context length is 8192 tokens" in e.message
    e = refused(openai.BadRequestError, chat_call, model=server.model.id, messages=chat("Hi"), max_tokens=0)
    assert e.param == "max_tokens" and "at least 1" in e.message
    e = refused(openai.BadRequestError, chat_call, model=server.model.id, messages=[{"role": "tool", "content": "x"}])
    assert e.param == "messages[0].role" and "no tool calling" in e.message


def test_a_body_over_the_limit_is_a_413_and_an_unknown_route_a_404(server):
    got, error = post(server, "/v1/completions", b" " * (server.max_body + 1))
    assert got == 413 and "over this server's limit" in error["error"]["message"]
    got, error = post(server, "/v1/embeddings", b"{}")
    assert got == 404 and "No route" in error["error"]["message"]


def test_the_api_checks_are_documented_by_examples():
    assert doctest.testmod(openai_api, optionflags=doctest.ELLIPSIS).failed == 0


# ---------------------------------------------------------------- one job at a time
def test_a_cell_while_serving_is_refused_at_once_and_the_server_goes_on(server, pipeline_pair, client, alone):
    ip = shell()
    magics.use(pipeline_pair)
    try:
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match=r"the ranks are serving \(for \d+ s\): stop the server first"):
            ip.run_cell_magic("mlx_dist", "", "x = 1")
        assert time.monotonic() - t0 < 5  # refused, not queued behind a job that runs until stopped
        assert "running: serving" in repr(ip.run_line_magic("mlx_cluster", "status"))
    finally:
        magics.use(None)
    r = client.chat.completions.create(model=server.model.id, messages=chat(QUESTIONS[0]), max_tokens=TOKENS)
    assert r.choices[0].message.content == alone[QUESTIONS[0]]


# ---------------------------------------------------------------- keys, stop
def test_stop_closes_the_port_and_frees_the_ranks(server, pipeline_pair):
    ip = shell()
    port = server.port
    ip.run_line_magic("mlx_serve", "stop")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert (
        pipeline_pair.run("mx.distributed.all_sum(mx.array([1.0]))").value["text/plain"] == "array([2], dtype=float32)"
    )
    with pytest.raises(UsageError, match="no server is running"):
        ip.run_line_magic("mlx_serve", "status")


def test_a_host_other_machines_reach_needs_a_key_and_every_request_is_checked(pipeline_pair):
    ip = shell()
    magics.instance().stop_server()  # the module's server, if the test before did not stop it
    magics.use(pipeline_pair)
    try:
        with pytest.raises(UsageError, match="give an --api-key"):
            ip.run_line_magic("mlx_serve", "--host 0.0.0.0 --port 0")
        ip.run_line_magic("mlx_serve", "--port 0 --api-key s3cret")
        url = magics.instance().server.url
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert refused.value.code == "invalid_api_key" and "--api-key" in refused.value.message
        keyed = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert keyed.completions.create(model="bundled", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        magics.instance().stop_server()
        magics.use(None)


def test_without_the_line_requests_and_tokens_go_through_ipyparallel_with_the_same_answers(pipeline_pair, alone):
    magics.instance().stop_server()  # the module's server, if a test before did not stop it
    server = serve(pipeline_pair, port=0, line=False)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=600)
        questions = QUESTIONS[:3]

        def ask(question: str) -> str:
            r = client.chat.completions.create(model=server.model.id, messages=chat(question), max_tokens=TOKENS)
            return r.choices[0].message.content

        with ThreadPoolExecutor(len(questions)) as pool:
            replies = list(pool.map(ask, questions))
        assert replies == [alone[q] for q in questions]
        assert server.status().channel == "ipyparallel's channels"
    finally:
        server.stop()


def test_while_others_generate_an_arrival_waits_for_company_and_goes_when_the_prefill_batch_fills(pipeline_pair, alone):
    # gather 10 s, prefill batch 2: a request arriving while a story generates waits on rank 0
    # for a second to share its prefill, and both go as soon as that one arrives
    shell()
    magics.instance().stop_server()  # the module's server, if a test before did not stop it
    server = serve(pipeline_pair, port=0, gather=10.0, prefill_batch=2)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=600)
        story = client.chat.completions.create(model=server.model.id, messages=STORY, max_tokens=4000, stream=True)
        pieces = iter(story)
        wait_for(lambda: next(pieces).choices[0].delta.content, what="the story's first words")
        server.first_tokens.clear()

        def ask(question: str) -> str:
            r = client.chat.completions.create(model=server.model.id, messages=chat(question), max_tokens=TOKENS)
            return r.choices[0].message.content

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(ask, QUESTIONS[0])
            wait_for(lambda: server.status().queued == 1, what="the first question handed to rank 0")
            time.sleep(1.0)  # the second comes a second later: the first waits for it, not for 10 s
            assert not first.done() and server.status().queued == 1
            second = pool.submit(ask, QUESTIONS[1])
            answers = [first.result(600), second.result(600)]
        assert answers == [alone[q] for q in QUESTIONS[:2]]
        assert server.status().running == 1  # the story generated all along
        waited = sorted(p.to_ranks for p in server.first_tokens)
        assert len(waited) == 2 and 1.0 <= waited[1] < 10, waited  # the first: the second's second, not 10 s
        assert "up to 2 prompts a pass; arrivals while others generate wait up to 10 s for others" in repr(
            server.status()
        )
        # the second's next turn, while the story still generates: a conversation goes on at once
        server.first_tokens.clear()
        turn = chat(QUESTIONS[1]) + [{"role": "assistant", "content": answers[1]}, {"role": "user", "content": "Why?"}]
        client.chat.completions.create(model=server.model.id, messages=turn, max_tokens=TOKENS)
        assert server.status().running == 1 and server.first_tokens[-1].to_ranks < 5, server.first_tokens[-1]
        story.close()
    finally:
        server.stop()


def test_the_line_to_rank_0_carries_signed_messages_in_order_and_drops_anyone_else_s(tmp_path):
    reports: queue.SimpleQueue = queue.SimpleQueue()
    notebook = NotebookEnd(reports.put)
    rank = RankEnd(notebook.address)
    key = bytes.fromhex(notebook.address.key)
    strangers = []
    try:
        assert notebook.opened.wait(10) and notebook.peer.startswith("tcp://127.0.0.1:")
        # another process on this machine reaches both ports but has no key: what it sends is
        # never opened (this pickle would create a file), never taken as a request
        opened = tmp_path / "opened"

        class Payload:
            def __reduce__(self):
                return (Path.touch, (opened,))

        for url, data, after in [
            (notebook.address.url, pickle.dumps(Payload()), pickle.dumps("after")),
            (notebook.peer, json.dumps({"serve": "x", "stop": True}).encode(), json.dumps("after").encode()),
        ]:
            stranger = zmq.Context.instance().socket(zmq.PUSH)
            strangers.append(stranger)
            stranger.connect(url)
            stranger.send(data)
            stranger.send_multipart([b"0" * 32, data])
            stranger.send_multipart([hmac.new(b"guess", data, hashlib.sha256).digest(), data])
            stranger.send_multipart(line._sign(key, after))  # in order on its connection: the others went first
        assert reports.get(timeout=10) == "after" and not opened.exists()
        assert wait_for(lambda: inbox(wait=0.5), 10, "rank 0's inbox") == ["after"]
        # the notebook's messages reach rank 0's inbox in order, and rank 0's reports the notebook
        for i in range(200):
            notebook.send({"i": i})
        got: list = []
        wait_for(lambda: got.extend(inbox(wait=0.1)) or len(got) >= 200, 10, "200 messages")
        assert [m["i"] for m in got] == list(range(200))
        for i in range(200):
            rank.report(Ready(float(i)))
        assert [reports.get(timeout=10).t for _ in range(200)] == list(range(200))
    finally:
        for s in strangers:
            s.close(linger=0)
        rank.close()
        notebook.close(wait=10)
    assert notebook.closed.is_set() and reports.empty()  # Closed came last, and is not a report
    with pytest.raises(ConnectionError, match="closed"):
        notebook.send({"late": True})


@pytest.mark.cluster
def test_stopping_the_cluster_ends_its_server_and_closes_the_port():
    with Cluster(n=1) as c:
        load_model(c, progress=False)
        server = serve(c, port=0)
        port = server.port
        assert openai.OpenAI(base_url=server.url, api_key="-", max_retries=0).models.list().data
    assert not server.serving and "the cluster was stopped" in server.status().state
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


RESET_CLIENT = """
import http.client, socket, struct, time
conn = http.client.HTTPConnection("127.0.0.1", server.port)
conn.request("GET", "/v1/models")
conn.getresponse().read()  # answered; the connection stays open for the next request
conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
conn.sock.close()
deadline = time.monotonic() + 10
while not server.log and time.monotonic() < deadline:
    time.sleep(0.05)
print(*server.log, sep="\\n")
"""


def test_the_serving_tutorial_runs_and_a_client_s_reset_is_a_line_in_the_server_log(execute_notebook):
    import nbformat

    path = Path(__file__).resolve().parent.parent / "notebooks" / "07_serving.ipynb"
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            cell.source = f"MAX_TOKENS = {TOKENS}"
    # before the server stops: a keep-alive client closes its connection with a reset, as a
    # killed script's or a closed browser tab's is; the cell waits for the server to see it
    at = next(i for i, c in enumerate(nb.cells) if c.source.startswith("%mlx_serve stop"))
    nb.cells.insert(at, nbformat.v4.new_code_cell(RESET_CLIENT))
    execute_notebook(path, nb=nb, timeout=600)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "connection ended (ConnectionResetError" in "".join(o.get("text", "") for o in nb.cells[at].outputs)
    assert "Exception occurred during processing" not in text and "Traceback" not in text
    assert text.count("Paris") >= 2 and "Aye" in text
    assert "404 The model 'gpt-4' does not exist" in text and "400 messages[0].role is 'wizard'" in text
    assert "requests running / queued" in text and "Stopped serving" in text and "rank 0 is free again" in text
    assert "running: serving" in text
    assert any(o.get("output_type") == "error" and "the ranks are serving" in o["evalue"] for o in outputs)
