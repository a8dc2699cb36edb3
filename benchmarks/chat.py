"""A chat that grows: the first token of each turn, with the ranks' prompt cache and without.

    python benchmarks/chat.py [-n 2] [--tensor] [--turns 6] [--system-words 300] [--tokens 32] [--rounds 2]

One conversation of ``--turns`` turns after a system prompt of ``--system-words`` words (about
1.3 tokens a word), each turn sent whole, as ``%mlx_chat`` sends it: ``generate(cluster,
messages)`` on ``-n`` ranks (a pipeline by default), the same turns once with the prompt cache
and once with it off (``prompt_cache(cluster, limit=0)``: every turn prefilled whole, as before
the cache), and mlx-lm's own chat loop in this one process (``stream_generate`` on one
``make_prompt_cache`` kept across turns, as ``mlx_lm.chat`` keeps it; each turn it is given what
the cache does not hold yet). Greedy; the same replies everywhere (they are checked). Rounds
alternate which mlx_nb side goes first; the table keeps each turn's lowest first-token time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlx_nb.rank import blas

blas.use()  # as in the ranks

from mlx_nb import Cluster  # noqa: E402
from mlx_nb.display import Table  # noqa: E402
from mlx_nb.generate import generate, load_model, prompt_cache  # noqa: E402

WORDS = (
    "lamp lens keeper storm ship harbour tide rock beacon signal light tower stair glass brass oil "
    "wick night fog horn wave coast reef cliff gull rope anchor mast sail chart compass star dawn"
).split()


def system_prompt(words: int) -> str:
    out = [WORDS[(i * 7 + i // 5) % len(WORDS)] for i in range(words)]
    return "You are the keeper's assistant. Notes: " + " ".join(out) + "."


def questions(turns: int) -> list[str]:
    return [f"Tell me about the {WORDS[(3 * t) % len(WORDS)]}, briefly ({t})." for t in range(1, turns + 1)]


def through_mlx_nb(cluster, system: str, asks: list[str], tokens: int) -> list:
    messages = [{"role": "system", "content": system}]
    out = []
    for q in asks:
        messages.append({"role": "user", "content": q})
        stats = generate(cluster, messages, tokens, quiet=True)
        messages.append({"role": "assistant", "content": stats.text})
        out.append(stats)
    return out


def one_process(path: str, system: str, asks: list[str], tokens: int) -> list[tuple[float, str]]:
    """mlx-lm's chat loop in this process: one prompt cache kept across the turns."""
    import time

    from mlx_lm import load, stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = load(path)
    cache, held = make_prompt_cache(model), []
    messages = [{"role": "system", "content": system}]
    out = []
    for q in asks:
        messages.append({"role": "user", "content": q})
        ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        common = 0
        while common < min(len(held), len(ids) - 1) and held[common] == ids[common]:
            common += 1
        for c in cache:
            c.trim(len(held) - common)
        t0, ttft, text, made = time.perf_counter(), None, "", []
        for r in stream_generate(model, tokenizer, ids[common:], max_tokens=tokens, prompt_cache=cache):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            text += r.text
            made.append(r.token)
        held = ids + made[:-1] if made else ids  # the last token was sampled, not fed
        messages.append({"role": "assistant", "content": text})
        out.append((ttft, text))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2)
    parser.add_argument("--tensor", dest="pipeline", action="store_false", help="tensor parallel (default pipeline)")
    parser.add_argument("--model", default=None, help="an mlx-lm model folder (default: the bundled SmolLM2)")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-words", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    system, asks = system_prompt(args.system_words), questions(args.turns)
    best: dict = {}
    with Cluster(n=args.n) as cluster:
        path = load_model(cluster, args.model, pipeline=args.pipeline, progress=False).model
        through_mlx_nb(cluster, system_prompt(args.system_words // 2), asks[:2], 4)  # warm every shape's kernels
        for i in range(args.rounds):
            for side in ("cached", "uncached") if i % 2 == 0 else ("uncached", "cached"):
                prompt_cache(cluster, clear=True, limit=0 if side == "uncached" else "auto")
                turns = through_mlx_nb(cluster, system, asks, args.tokens)
                for t, stats in enumerate(turns):
                    have = best.get((side, t))
                    best[(side, t)] = stats if have is None or stats.ttft < have.ttft else have
                print(f"round {i + 1}, {side}: " + ", ".join(f"{s.ttft:.2f}" for s in turns), flush=True)
        prompt_cache(cluster, limit="auto")
    plain = one_process(path, system, asks, args.tokens)
    rows = []
    for t in range(args.turns):
        cached, uncached, (ttft, text) = best[("cached", t)], best[("uncached", t)], plain[t]
        same = cached.text == uncached.text == text
        rows.append(
            [
                t + 1,
                cached.prompt_tokens,
                f"{cached.cached_tokens}",
                f"{cached.ttft:.3f}",
                f"{uncached.ttft:.3f}",
                f"{ttft:.3f}",
                f"{cached.ttft / best[('cached', 0)].ttft:.2f}x",
                f"{cached.ttft / ttft:.2f}x",
                "yes" if same else "NO",
            ]
        )
    layout = ("pipeline" if args.pipeline else "tensor") + f" parallel on {args.n} ranks"
    title = (
        f"{Path(path).name}, {layout}; system prompt of {args.system_words} words, {args.tokens} tokens "
        f"per reply, greedy; each turn's best of {args.rounds} rounds; {blas.what_computes()}"
    )
    header = [
        "turn",
        "prompt tokens",
        "from the cache",
        "mlx_nb first token (s)",
        "cache off (s)",
        "mlx-lm chat loop, one process (s)",
        "mlx_nb vs its turn 1",
        "mlx_nb vs mlx-lm",
        "same reply",
    ]
    print(Table(header, rows, title))


if __name__ == "__main__":
    main()
