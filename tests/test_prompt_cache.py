"""The ranks' prompt cache with the bundled model: the next chat turn and a shared system prompt
are prefilled only past what the cache holds, and the replies are the ones one mlx-lm process
gives without any cache, token for token: chat turns on pipeline and tensor-parallel ranks, a
batch, served requests through the official openai client. Eviction under a small limit,
emptied by a load, its memory back to the system once emptied (a CPU rank), one malloc arena a
rank, no entry from a client that left mid-stream; prompts from the cache merged with room and
split without copies, token for token as mlx-lm's own generator."""

from __future__ import annotations

import threading

import ipyparallel as ipp
import mlx.core as mx
import openai
import pytest
from conftest import CHAT_SYSTEM as SYSTEM
from conftest import CHAT_TOKENS as TOKENS
from conftest import CHAT_TURNS as TURNS
from conftest import KV_BYTES_PER_TOKEN, conversation, ipython_shell, uncached, wait_for

from mlx_nb import magics
from mlx_nb.batch import generate_batch
from mlx_nb.generate import generate, load_model, prompt_cache
from mlx_nb.models import prepare_bundled
from mlx_nb.rank import memory
from mlx_nb.widgets import ChatWidget


class Tokens:
    """The bundled model's tokenizer, to count what a prompt is."""

    def __init__(self, ranks) -> None:
        from mlx_lm.utils import load_tokenizer

        self.tokenizer = load_tokenizer(prepare_bundled(ranks))

    def ids(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


@pytest.fixture(scope="module")
def tok(pipeline_pair) -> Tokens:
    return Tokens(pipeline_pair.ranks)


def test_chat_turns_on_a_pipeline_reuse_the_cache_and_equal_the_uncached_replies(pipeline_pair):
    prompt_cache(pipeline_pair, clear=True)
    turns, report = conversation(pipeline_pair)
    for n, (stats, expected, prompt) in enumerate(turns):
        assert stats.tokens == expected, f"turn {n + 1}"
        assert stats.prompt_tokens == prompt
    first = turns[0][0]
    assert first.cached_tokens == 0 and first.prefilled_tokens == first.prompt_tokens
    for (before, _, _), (stats, _, _) in zip(turns, turns[1:]):
        # the previous turn's whole prompt came from the cache: only the reply and the new
        # question were prefilled
        assert stats.cached_tokens >= before.prompt_tokens
        assert stats.prefilled_tokens <= stats.prompt_tokens - before.prompt_tokens
        assert f"({stats.cached_tokens} cached, {stats.prefilled_tokens} prefilled)" in stats.summary()
    assert [r.rank for r in report.ranks] == [0, 1]
    assert all(r.entries >= 1 and 0 < r.bytes <= r.limit for r in report.ranks)
    # each rank holds its own 15 layers of every entry: half of what one process would
    assert all(r.bytes * 2 in {r.tokens * b for b in KV_BYTES_PER_TOKEN} for r in report.ranks)
    assert report.ranks[0].hits >= 2 and "hits in" in repr(report)


def test_a_batch_sharing_a_system_prompt_prefills_it_once_and_equals_the_uncached_replies(pipeline_pair, tok):
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in TURNS]
    expected = [s.tokens for s in uncached(pipeline_pair, prompts)]
    prompt_cache(pipeline_pair, clear=True)
    first = generate_batch(pipeline_pair, prompts, TOKENS, quiet=True)
    again = generate_batch(pipeline_pair, prompts, TOKENS, quiet=True)
    assert [r.tokens for r in first.replies] == expected
    assert [r.tokens for r in again.replies] == expected
    # the first time, one prompt prefills the system prompt and the others wait for its entry
    system_tokens = len(tok.ids([{"role": "system", "content": SYSTEM}]))
    cached = sorted(r.cached_tokens for r in first.replies)
    assert cached[0] == 0 and all(n >= system_tokens - 5 for n in cached[1:]), cached
    # the second time each prompt finds itself (its whole prompt but its last token)
    assert [r.cached_tokens for r in again.replies] == [r.prompt_tokens - 1 for r in again.replies]
    assert "cached" in again.summary()
    # the entries of the prompts that began from the first one's system prompt hold it once: each
    # rank's bytes are those of fewer tokens than its entries hold (every rank holds its own layers)
    prompt_cache(pipeline_pair, clear=True)
    one = generate(pipeline_pair, prompts[0], TOKENS, quiet=True)  # a reply's entry, alone
    assert one.tokens == expected[0]
    alone = prompt_cache(pipeline_pair).ranks
    prompt_cache(pipeline_pair, clear=True)
    generate_batch(pipeline_pair, prompts, TOKENS, quiet=True)
    for held, single in zip(prompt_cache(pipeline_pair).ranks, alone):
        per_token = single.bytes / single.tokens
        assert held.bytes <= (held.tokens - (len(prompts) - 2) * system_tokens * 0.9) * per_token, (held, single)


def test_prompts_from_the_cache_batch_and_split_as_in_mlx_lm_without_its_copies():
    """A rank's batch merges prompts that start from the prompt cache with room for their new
    tokens, and hands prefilled prompts to decoding without mlx-lm's copies of the batch's KV
    cache (``rank/batch.py``: ``_Roomy``, ``_PromptBatch``): the same greedy tokens as mlx-lm's
    own generator, whether the whole batch is prefilled at once (its cache handed over) or some
    prompts go on prefilling (a small prefill step: the batch split). A small random llama: the
    generator's bookkeeping is what is compared, at any model's size."""
    import random

    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models import llama
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    from mlx_nb.rank import batch

    mx.random.seed(0)
    model = llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=512,
        )
    )
    mx.eval(model.parameters())
    rng = random.Random(0)
    system = [rng.randrange(512) for _ in range(300)]
    held = make_prompt_cache(model)
    model(mx.array([system]), cache=held)
    mx.eval([c.state for c in held])
    cut = [300, 297, 40, 300, 250, 299]  # where each prompt's cached tokens end
    asks = [system + [rng.randrange(512) for _ in range(n)] for n in (5, 20, 12, 1, 9, 30)]

    def cached(n: int) -> list:
        out = []
        for c in held:
            layer = KVCache()
            layer.state = (c.keys[..., :n, :], c.values[..., :n, :], n)
            out.append(layer)
        return out

    splits = []
    real_split = batch._PromptBatch.split

    def split(self, indices):  # a spy: the real split runs
        splits.append("all" if sorted(indices) == list(range(len(self.uids))) else "some")
        return real_split(self, indices)

    def run(step: int, ours: bool) -> list[list[int]]:
        gen = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8, prefill_step_size=step)
        caches = [cached(n) for n in cut]
        if ours:
            batch._lighter_splits(gen)
            assert type(gen._prompt_batch) is batch._PromptBatch
            caches = [batch._roomy(c) for c in caches]
        uids = gen.insert([a[n:] for a, n in zip(asks, cut)], [16] * len(asks), caches=caches)
        got = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                got[r.uid].append(r.token)
        gen.close()
        return [got[u] for u in uids]

    batch._PromptBatch.split = split
    try:
        for step, way in ((2048, "all"), (16, "some")):
            splits.clear()
            ours, theirs = run(step, ours=True), run(step, ours=False)
            assert ours == theirs, step
            assert all(len(t) == 16 for t in ours) and len({tuple(r) for r in ours}) > 3  # replies differ
            assert way in splits, (step, splits)
    finally:
        batch._PromptBatch.split = real_split


@ipp.interactive  # run in the engine's namespace: this test module is not importable there
def count_forward_passes(on: bool):
    """On a rank, from ``on=True`` to ``on=False``: the length of each input its model was called with."""
    from mlx_nb.rank.generate import loaded

    model = type(loaded().model)
    if on:
        original, calls = model.__call__, []

        def counted(self, inputs, *args, **kwargs):
            calls.append(inputs.shape[1])
            return original(self, inputs, *args, **kwargs)

        model.__call__, model._counted = counted, (original, calls)
        return None
    (model.__call__, calls), model._counted = model._counted, None
    return calls


def test_a_batch_ending_at_max_tokens_runs_no_step_past_its_last_tokens(pipeline_pair):
    prompts = [[{"role": "user", "content": q}] for q in TURNS[:2]]
    pipeline_pair.call(count_forward_passes, True)
    try:
        result = generate_batch(pipeline_pair, prompts, 6, quiet=True)
    finally:
        calls = pipeline_pair.call(count_forward_passes, False)
    assert [(len(r.tokens), r.finish_reason) for r in result.replies] == [(6, "length")] * 2
    # both prompts prefilled at once, then one step per token: the one from the prompts' last
    # token and one for each token but the last (mlx-lm's generator would start a 7th, its
    # tokens thrown away, that the next request waits for); each rank its own layers of each
    for rank in calls:
        assert [n for n in rank if n > 1] != [] and [n for n in rank if n == 1] == [1] * 6


def test_rank_0_tells_a_conversations_next_turn_from_a_new_one_sharing_its_system_prompt(pipeline_pair, tok):
    system = {"role": "system", "content": SYSTEM}
    asked = [system, {"role": "user", "content": TURNS[0]}]
    prompt_cache(pipeline_pair, clear=True)
    reply = generate_batch(pipeline_pair, [asked], TOKENS, quiet=True).replies[0]
    turn = tok.ids([*asked, {"role": "assistant", "content": reply.text}, {"role": "user", "content": TURNS[1]}])
    other = tok.ids([system, {"role": "user", "content": TURNS[2]}])

    @ipp.interactive
    def continues(prompts):
        from mlx_nb.rank.generate import loaded

        return [loaded().cache.continues(p) for p in prompts]

    # the next turn goes on from the reply the cache holds: rank 0 takes it in at once; another
    # user's first question after the same system prompt may have company coming (it waits 10 ms)
    assert pipeline_pair.call(continues, [turn, other], ranks=0) == [True, False]


def test_eviction_keeps_every_rank_within_a_small_limit(pipeline_pair, tok):
    prompt_cache(pipeline_pair, clear=True)
    a = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
    b = [{"role": "system", "content": SYSTEM.replace("lighthouse", "windmill")}, {"role": "user", "content": TURNS[0]}]
    first = generate(pipeline_pair, a, TOKENS, quiet=True)
    held = prompt_cache(pipeline_pair).ranks
    per_entry = max(r.bytes for r in held)
    try:
        # room for one such entry on each rank, not two
        prompt_cache(pipeline_pair, limit=int(per_entry * 1.5))
        generate(pipeline_pair, b, TOKENS, quiet=True)
        ranks = prompt_cache(pipeline_pair).ranks
        assert all(r.entries == 1 and r.bytes <= r.limit for r in ranks)
        assert generate(pipeline_pair, b, TOKENS, quiet=True).cached_tokens == len(tok.ids(b)) - 1  # b is held
        back = generate(pipeline_pair, a, TOKENS, quiet=True)  # a was evicted: only the template's start is shared
        assert back.cached_tokens < 10 and back.tokens == first.tokens
    finally:
        prompt_cache(pipeline_pair, limit="auto")
    assert all(r.limit > 10 * per_entry for r in prompt_cache(pipeline_pair).ranks)  # the default share again


def test_a_limit_that_is_not_a_size_is_refused_before_the_ranks_are_asked(pipeline_pair):
    with pytest.raises(ValueError, match=r"limit: not a size: 'lots' \(use bytes or KB / MB / GB, e.g. 2GB\)"):
        prompt_cache(pipeline_pair, limit="lots")
    with pytest.raises(ValueError, match="cache_limit must be at least 0 bytes, got -1"):
        load_model(pipeline_pair, pipeline=True, cache_limit=-1, progress=False)


def test_the_cluster_magic_shows_and_empties_the_cache(pipeline_pair, capsys):
    ip = ipython_shell()
    if "mlx_nb" not in ip.extension_manager.loaded:
        ip.run_line_magic("load_ext", "mlx_nb")
    magics.use(pipeline_pair)
    try:
        generate(pipeline_pair, [{"role": "user", "content": TURNS[0]}], TOKENS, quiet=True)
        shown = ip.run_line_magic("mlx_cluster", "cache")
        assert shown.ranks[0].entries >= 1 and "entries" in repr(shown)
        emptied = ip.run_line_magic("mlx_cluster", "cache --clear")
        assert "Emptied the prompt cache on every rank." in capsys.readouterr().out
        assert all(r.entries == 0 and r.bytes == 0 for r in emptied.ranks)
    finally:
        magics.use(None)


@pytest.mark.skipif(
    memory._glibc() is None or mx.default_device().type == mx.gpu,
    reason="a CPU rank keeps freed memory with glibc (Linux); a GPU's MLX keeps its own cache of buffers",
)
def test_emptying_the_cache_gives_its_memory_back_to_the_system(pipeline_pair):
    def resident(trim: bool) -> int:  # defined here: the ranks get it by value, not from this module
        """A rank's resident memory (Linux): what the system counts it as holding."""
        from mlx_nb.rank import memory

        if trim:  # what was freed before goes back: only what the clearing frees is measured
            memory.give_back()
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))

    # a CPU rank keeps freed memory for its next batch (memory.keep_freed): not what a cache holds
    story = "The keeper climbed the stairs to light the lamp before the storm. " * 40
    prompts = [[{"role": "user", "content": f"Story {i}. {story}"}] for i in range(3)]
    generate_batch(pipeline_pair, prompts, 2, quiet=True)
    held = [r.bytes for r in prompt_cache(pipeline_pair).ranks]
    assert all(h > 30 << 20 for h in held), held
    before = pipeline_pair.call(resident, True)
    prompt_cache(pipeline_pair, clear=True)
    after = pipeline_pair.call(resident, False)
    for rank, (b, a, h) in enumerate(zip(before, after, held)):
        assert b - a > 0.8 * h, f"rank {rank}: {(b - a) >> 20} MiB went back of the {h >> 20} MiB the cache held"


def test_a_rank_allocates_from_one_malloc_arena_whatever_thread_asks(pipeline_pair):
    """glibc gives each thread that allocates an arena of its own, and MLX's CPU streams each run
    on a thread: memory one stream freed did not serve the generation stream's next batch, which
    waited for fresh pages instead. A rank starts with ``MALLOC_ARENA_MAX=1``: after generating,
    its process still has one arena (glibc's ``malloc_info`` lists them)."""
    if memory._glibc() is None:
        pytest.skip("malloc arenas are glibc's")

    def arenas() -> int:  # defined here: the ranks get it by value, not from this module
        import ctypes
        import os
        import tempfile

        libc = ctypes.CDLL(None)
        libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
        libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
        fd, path = tempfile.mkstemp()
        os.close(fd)
        f = libc.fopen(path.encode(), b"w")
        libc.malloc_info(0, f)
        libc.fclose(f)
        with open(path) as text:
            count = text.read().count("<heap nr=")
        os.unlink(path)
        return count

    generate_batch(pipeline_pair, [[{"role": "user", "content": q}] for q in TURNS], 4, quiet=True)
    assert pipeline_pair.call(arenas) == [1, 1]


def test_the_chat_widget_says_what_came_from_the_cache_and_new_chat_empties_it(pipeline_pair):
    chat = ChatWidget(pipeline_pair, max_tokens=TOKENS, system=SYSTEM)
    chat.ask(TURNS[0], wait=True)
    chat.ask(TURNS[1], wait=True)
    assert "cached," in chat._turns[-1] and "prefilled" in chat._turns[-1]
    chat.reset()
    assert chat.messages == [{"role": "system", "content": SYSTEM}] and chat._turns == []
    assert all(r.entries == 0 for r in prompt_cache(pipeline_pair).ranks)


def test_loading_a_model_empties_the_cache(pipeline_pair):
    messages = [{"role": "user", "content": TURNS[2]}]
    before = generate(pipeline_pair, messages, TOKENS, quiet=True)
    assert generate(pipeline_pair, messages, TOKENS, quiet=True).cached_tokens > 0
    info = load_model(pipeline_pair, pipeline=True, progress=False)
    assert all(s.entries == 0 for s in info["cache"])
    again = generate(pipeline_pair, messages, TOKENS, quiet=True)
    assert again.cached_tokens == 0 and again.tokens == before.tokens


def test_a_cache_limit_of_zero_turns_it_off(pipeline_pair):
    try:
        load_model(pipeline_pair, pipeline=True, cache_limit=0, progress=False)
        messages = [{"role": "user", "content": TURNS[0]}]
        generate(pipeline_pair, messages, TOKENS, quiet=True)
        assert generate(pipeline_pair, messages, TOKENS, quiet=True).cached_tokens == 0
        assert "off: its limit is 0 bytes" in repr(prompt_cache(pipeline_pair))
    finally:
        load_model(pipeline_pair, pipeline=True, progress=False)


# ------------------------------------------------------------------ served
QUESTIONS = TURNS + ["What is a foghorn for?"]
SHARED = {q: [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS}
STORY = [{"role": "user", "content": "Tell me a very long story about a lighthouse keeper named Ada."}]


@pytest.fixture(scope="module")
def served_expected(pipeline_pair) -> dict:
    """The served prompts' replies with the cache off, before the server takes the ranks."""
    prompts = [*SHARED.values(), STORY]
    return dict(zip([*SHARED, "story"], uncached(pipeline_pair, prompts)))


@pytest.fixture(scope="module")
def server(pipeline_pair, served_expected):
    from mlx_nb.serve import serve

    s = serve(pipeline_pair, port=0)
    yield s
    s.stop()


def test_served_requests_sharing_a_system_prompt_prefill_it_once(server, served_expected, tok):
    client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=600)
    questions, prompts = QUESTIONS, SHARED
    expected = {q: served_expected[q].text for q in questions}

    def wave() -> dict:
        got: dict = {}

        def ask(q: str) -> None:
            got[q] = client.chat.completions.create(model=server.model.id, messages=prompts[q], max_tokens=TOKENS)

        threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        return got

    first, second = wave(), wave()
    for got in (first, second):
        assert {q: r.choices[0].message.content for q, r in got.items()} == expected
    system_tokens = len(tok.ids([{"role": "system", "content": SYSTEM}]))
    # arriving together, the first wave prefills the system prompt once: the others wait for it
    first_cached = sorted(r.usage.prompt_tokens_details.cached_tokens for r in first.values())
    assert all(n >= system_tokens - 5 for n in first_cached[1:]), first_cached
    for q, r in second.items():
        assert r.usage.prompt_tokens == len(tok.ids(prompts[q]))
        assert r.usage.prompt_tokens_details.cached_tokens >= system_tokens - 5, q
    status = server.status()
    assert status.cached_tokens >= len(questions) * (system_tokens - 5)
    assert "prompt tokens: from the cache / all" in repr(status)


def test_a_client_that_leaves_mid_stream_leaves_no_entry_a_later_request_hits(server, served_expected, tok):
    client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=600)
    story = STORY
    stream = client.chat.completions.create(model=server.model.id, messages=story, max_tokens=2000, stream=True)
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if len(pieces) == 5:
            break
    left = server.status().cancelled
    stream.close()  # the client leaves, its sequence half generated
    wait_for(lambda: server.status().cancelled > left, 60, "the server to see the client leave")
    # a request sent after the cancel ends after the ranks took it (and decided on its cache)
    client.completions.create(model=server.model.id, prompt="Hi", max_tokens=2)
    # its prompt, prefilled whole, is an entry; its half-written reply is not: a prompt that goes
    # on from the reply's first tokens (greedy: the uncached reply's) finds only the prompt cached
    reply = served_expected["story"]
    ids = tok.ids(story)
    r = client.completions.create(model=server.model.id, prompt=ids + reply.tokens[:4], max_tokens=1)
    assert len(pieces) == 5 and r.usage.prompt_tokens_details.cached_tokens <= len(ids)
    r = client.chat.completions.create(model=server.model.id, messages=story, max_tokens=TOKENS)
    assert r.choices[0].message.content == reply.text


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_a_new_entry_lets_go_of_its_batch_s_buffers_once_copied():
    """An entry is first a view of a finished sequence's KV cache, which holds its whole batch's
    buffers; once copied (the ranks copy while idle or after a step), only its own tokens."""
    import gc

    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mlx_nb.rank.prompt_cache import PromptCache

    shape = (8, 2, 4096, 64)  # a batch of 8 sequences' keys (and values) of one layer
    keys, values = mx.ones(shape), mx.ones(shape)
    mx.eval(keys, values)
    batch_bytes = keys.nbytes + values.nbytes  # 32 MiB
    layer = KVCache()
    layer.state = (keys[:1, :, :100, :], values[:1, :, :100, :], 100)  # one sequence's 100 tokens
    del keys, values
    pc = PromptCache(0, per_token=[2 * 2 * 64 * 4], limits=[1 << 30])
    pc.finished("seq", [layer], list(range(100)))
    pc.apply(pc.decide())
    del layer
    gc.collect()
    held = mx.get_active_memory()
    assert list(pc.loose) == [0] and held >= batch_bytes  # the view keeps the batch's buffers
    assert pc.compact() == 1 and not pc.loose
    entry_bytes = 2 * 2 * 100 * 64 * 4
    # the batch's 32 MiB went, the entry's 100 KiB came (MLX's own allocations of a few KiB aside:
    # after a model has run in this process, a copy also allocates 8 KiB)
    assert held - mx.get_active_memory() >= batch_bytes - entry_bytes - (64 << 10)
    assert pc.status().bytes == entry_bytes and pc.status().tokens == 100
    assert mx.array_equal(pc.entries[0][0][0].keys, mx.ones((1, 2, 100, 64))).item()


def test_copies_of_new_entries_go_a_bounded_amount_at_a_time():
    """The ranks copy new entries a few MiB at a time (a request arriving meanwhile waits for no
    more): a call copies whole layers until its budget is spent, each layer's copy letting go of
    that layer's batch buffers, and the entry stays loose until its last layer is copied."""
    import gc

    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mlx_nb.rank.prompt_cache import PromptCache

    shape = (8, 2, 4096, 64)  # each layer: a batch of 8 sequences' keys (and values)
    layers = []
    for _ in range(3):
        keys, values = mx.ones(shape), mx.ones(shape)
        mx.eval(keys, values)
        layer = KVCache()
        layer.state = (keys[:1, :, :100, :], values[:1, :, :100, :], 100)
        layers.append(layer)
    del keys, values
    batch_bytes = 2 * 8 * 2 * 4096 * 64 * 4  # one layer's batch: 32 MiB
    pc = PromptCache(0, per_token=[3 * 2 * 2 * 64 * 4], limits=[1 << 30])
    pc.finished("seq", layers, list(range(100)))
    pc.apply(pc.decide())
    del layers, layer
    gc.collect()
    held = [mx.get_active_memory()]
    for budget in (1, 1):  # the first layer's copy spends the budget: one layer a call
        assert pc.compact(budget=budget) == 0 and list(pc.loose) == [0]
        held.append(mx.get_active_memory())
    assert pc.compact(budget=1) == 1 and not pc.loose
    held.append(mx.get_active_memory())
    freed = [a - b for a, b in zip(held, held[1:])]
    copy = 2 * 2 * 100 * 64 * 4  # a layer's 100 tokens
    assert all(f >= batch_bytes - copy - (64 << 10) for f in freed), freed  # a layer's batch, each call
    assert pc.status().bytes == 3 * copy
    assert all(mx.array_equal(layer[0].keys, mx.ones((1, 2, 100, 64))).item() for layer in pc.entries[0])


def test_entries_that_began_from_one_entry_hold_the_tokens_they_share_once():
    """Sequences that began from the first 200 tokens of a 300-token entry (a system prompt and one
    question; then two other questions) hold those 200 tokens once, with it: their own tokens are
    copies, the shared ones the same pieces, and each entry still gives back its own tokens."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mlx_nb.rank.prompt_cache import Hit, PromptCache

    def layer(x: mx.array) -> KVCache:
        c = KVCache()
        c.state = (x, x + 1, x.shape[2])
        return c

    def seq(tokens: int, seed: int) -> mx.array:
        return mx.random.normal((1, 2, tokens, 8), key=mx.random.key(seed))

    per_token = 2 * (2 * 2 * 8 * 4)  # 2 layers x keys and values x 2 heads x 8 dims x float32
    pc = PromptCache(0, per_token=[per_token], limits=[1 << 30])
    first = [seq(300, 1), seq(300, 2)]  # two layers
    pc.finished("first", [layer(x) for x in first], list(range(300)))
    pc.apply(pc.decide())
    pc.compact()
    hit = Hit(entry=0, tokens=200)
    tails, bases = [], []
    for i in (1, 2):  # each began from entry 0's first 200 tokens, then 30 of its own
        start = pc.take(hit, _Model(2))
        bases.append(pc.base(hit))
        tail = [seq(30, 10 * i + j) for j in range(2)]
        tails.append(tail)
        whole = [mx.concatenate([c.keys, t], axis=2) for c, t in zip(start, tail)]
        tokens = list(range(200)) + [1000 * i + k for k in range(30)]
        pc.finished(("seq", i), [layer(x) for x in whole], tokens, base=bases[-1])
    pc.apply(pc.decide())
    pc.compact()
    status = pc.status()
    assert status.entries == 3 and status.tokens == 300 + 2 * 230
    assert status.bytes == (300 + 2 * 30) * per_token  # not 300 + 2 x 230
    for eid, tail in ((1, tails[0]), (2, tails[1])):
        got = pc.take(Hit(entry=eid, tokens=230), _Model(2))
        for c, x, t in zip(got, first, tail):
            assert mx.array_equal(c.keys, mx.concatenate([x[..., :200, :], t], axis=2)).item()
            assert mx.array_equal(c.values, mx.concatenate([x[..., :200, :], t], axis=2) + 1).item()
    # entry 0 itself is whole still, now in two pieces
    got = pc.take(Hit(entry=0, tokens=300), _Model(2))
    assert all(mx.array_equal(c.keys, x).item() for c, x in zip(got, first))
    # a third began from entry 1's first 100 tokens: the piece the three hold is cut there for
    # all of them, and each still gives back its own tokens
    start = pc.take(Hit(entry=1, tokens=100), _Model(2))
    base = pc.base(Hit(entry=1, tokens=100))
    third = [seq(20, 30 + j) for j in range(2)]
    whole = [mx.concatenate([c.keys, t], axis=2) for c, t in zip(start, third)]
    pc.finished(("seq", 3), [layer(x) for x in whole], list(range(100)) + [3000 + k for k in range(20)], base=base)
    pc.apply(pc.decide())
    pc.compact()
    assert pc.status().bytes == (300 + 2 * 30 + 20) * per_token
    assert [len(pieces) for pieces in pc.entries[0]] == [3, 3]  # [0:100], [100:200], [200:300]
    expect = {0: first, 1: [mx.concatenate([x[..., :200, :], t], axis=2) for x, t in zip(first, tails[0])]}
    expect[2] = [mx.concatenate([x[..., :200, :], t], axis=2) for x, t in zip(first, tails[1])]
    expect[3] = [mx.concatenate([x[..., :100, :], t], axis=2) for x, t in zip(first, third)]
    for eid, xs in expect.items():
        got = pc.take(Hit(entry=eid, tokens=xs[0].shape[2]), _Model(2))
        assert all(mx.array_equal(c.keys, x).item() for c, x in zip(got, xs)), eid
    # the entry they share from going leaves them whole
    pc.apply(_evict(pc, 0))
    assert pc.status().bytes == (200 + 2 * 30 + 20) * per_token
    got = pc.take(Hit(entry=2, tokens=230), _Model(2))
    assert mx.array_equal(got[1].keys, expect[2][1]).item()
    # a whole entry's tokens (a next turn) or a few share nothing, and hold nothing for it
    assert pc.base(Hit(entry=2, tokens=229)) is None and pc.base(Hit(entry=2, tokens=10)) is None


class _Model:
    """What ``make_prompt_cache`` needs of a model: its layers (a KVCache each)."""

    def __init__(self, n: int) -> None:
        self.layers = [None] * n


def _evict(pc, eid: int):
    from mlx_nb.rank.prompt_cache import Changes

    pc.index._drop(eid)
    return Changes(evict=[eid])


def test_a_next_turn_that_arrives_before_rank_0_stored_the_reply_goes_on_from_it():
    """A reply that ended at an end-of-sequence token is stored two plans later; its client's next
    turn may reach rank 0 first, and is a conversation going on all the same (a server takes such
    a turn in at once, not held for others)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mlx_nb.rank.prompt_cache import PromptCache

    prompt, reply = list(range(8)), [50, 51, 52, 53]
    layer = KVCache()
    layer.state = (mx.ones((1, 2, 12, 64)), mx.ones((1, 2, 12, 64)), 12)
    pc = PromptCache(0, per_token=[2 * 2 * 64 * 4], limits=[1 << 30])
    pc.finished(7, [layer], prompt + reply, len(prompt))  # finished, not yet decided on
    turn = prompt + reply + [60, 61]
    assert pc.continues(turn) and not pc.continues(prompt + [99]) and not pc.continues(prompt)
    pc.apply(pc.decide())
    assert not pc.pending and pc.continues(turn)


def test_rank_zeros_decisions_are_documented_by_examples():
    import doctest

    from mlx_nb.rank import prompt_cache as module

    failures, tried = doctest.testmod(module, verbose=False)
    assert tried >= 5 and failures == 0
