"""Fuzzing the hostfile parser: random mutations of valid hostfiles (seeded, so a failure
repeats) each give a one-line HostfileError or a cluster description, never another error."""

from __future__ import annotations

import copy
import json
import random
import time

import pytest

from mlx_nb import hostfile as hf
from mlx_nb import rank_env
from mlx_nb.hostfile import HostfileError
from mlx_nb.preflight import warnings

RING = {"backend": "ring", "hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]}
JACCL = {
    "backend": "jaccl",
    "envs": ["MLX_METAL_FAST_SYNCH=1"],
    "hosts": [
        {"ssh": "mac1", "ips": ["192.168.1.11"], "rdma": [None, "rdma_en3", ["rdma_en4", "rdma_en5"]]},
        {"ssh": "mac2", "ips": ["192.168.1.12"], "rdma": ["rdma_en3", None, "rdma_en5"]},
        {"ssh": "mac3", "ips": ["192.168.1.13"], "rdma": [["rdma_en4", "rdma_en2"], "rdma_en3", None]},
    ],
}
JACCL_RING = {
    "backend": "jaccl-ring",
    "hosts": [
        {
            "ssh": f"mac{i}",
            "ips": [f"10.0.0.{i}"],
            "rdma": [None if j not in ((i - 1) % 4, (i + 1) % 4) else f"rdma_en{j + 2}" for j in range(4)],
        }
        for i in range(4)
    ],
}
NCCL = {"backend": "nccl", "hosts": [{"ssh": "gpu1", "ips": ["10.1.0.1"]}, {"ssh": "gpu2", "ips": ["10.1.0.2"]}]}
MPI = {"backend": "mpi", "envs": ["OMP_NUM_THREADS=1"], "hosts": [{"ssh": "a"}, {"ssh": "a"}, {"ssh": "b"}]}
PLAIN = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "localhost", "ips": ["127.0.0.1"]}]
VALID = [RING, JACCL, JACCL_RING, NCCL, MPI, PLAIN]

ODD_VALUES = [
    None,
    True,
    0,
    -1,
    7,
    1e308,
    2**70,
    float("nan"),
    float("inf"),
    "",
    " ",
    "-",
    "-oProxyCommand=x",
    "mac1",
    "10.0.0.1",
    "::1",
    "a" * 300,
    "é\u200bx",
    "\x00",
    "null",
    "rdma_en3",
    "ring",
    "MLX_X=1",
    "=1",
    [],
    [None],
    [""],
    [[]],
    [1, 2],
    {},
    {"ssh": "x"},
    {"hosts": []},
]
KEYS = ["ssh", "ips", "rdma", "backend", "envs", "hosts", "ip", "host", "rdmas", "", "ssh "]


def _paths(doc, path=()):
    yield path
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in children:
        yield from _paths(value, path + (key,))


def _mutate_structure(doc, rng: random.Random):
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(_paths(doc)))
        if not path:
            doc = rng.choice([doc, rng.choice(ODD_VALUES), [doc], {"hosts": doc}])
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key, how = path[-1], rng.random()
        if how < 0.5:
            parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif how < 0.65:
            del parent[key]
        elif how < 0.8 and isinstance(parent, dict):
            parent[rng.choice(KEYS)] = parent.pop(key)
        elif isinstance(parent, list):
            parent.insert(rng.randrange(len(parent) + 1), copy.deepcopy(parent[key]))
        else:
            parent[rng.choice(KEYS)] = copy.deepcopy(rng.choice(ODD_VALUES))
    return json.dumps(doc)


# rarer edits: a number Python will not convert, nesting deeper than its recursion limit
HUGE = ["1" * 4400, "[" * 1100, "[" * 1100 + "]" * 1100, '{"a":' * 1100]


def _mutate_text(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(text) + 1)
        how = rng.random()
        if how < 0.02:
            text = text[:i] + rng.choice(HUGE) + text[i:]
        elif how < 0.3:
            text = text[:i] + text[i + 1 :]
        elif how < 0.6:
            text = text[:i] + rng.choice('{}[]",:0-9 \n\\nulltrue-x\u00e9\x00') + text[i:]
        elif how < 0.8:
            j = rng.randrange(len(text) + 1)
            text = text[:i] + text[min(i, j) : max(i, j)] + text[i:]
        else:
            text = text[:i]
    return text


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(data) + 1)
        data = data[:i] + bytes([rng.randrange(256)]) + data[i + rng.randint(0, 1) :]
    return data


def _outcome(source, backend) -> str:
    """'ok' (a cluster was described) or 'error' (a one-line HostfileError); any other exception escapes.

    ``source`` is JSON text, or the bytes of a file.
    """
    try:
        hostfile = hf.loads(source, "fuzz.json")
        described = rank_env.describe(hostfile, backend)
        warnings(hostfile)
    except HostfileError as e:
        assert "\n" not in str(e), f"a multi-line error for {source!r}: {e}"
        return "error"
    assert described.splitlines()[0].split(" rank")[0].isdigit()
    return "ok"


def test_random_mutations_of_valid_hostfiles_give_a_one_line_error_or_a_cluster():
    rng = random.Random(20240611)
    seen = {"ok": 0, "error": 0}
    t0 = time.monotonic()
    for case in range(4500):
        doc = rng.choice(VALID)
        if case % 3 == 0:
            source = _mutate_text(json.dumps(doc, indent=1), rng)
        elif case % 3 == 1:
            source = _mutate_structure(doc, rng)
        else:
            source = _mutate_bytes(json.dumps(doc).encode(), rng)
        backend = rng.choice([None, None, None, *hf.BACKENDS, "gloo"])
        try:
            seen[_outcome(source, backend)] += 1
        except AssertionError:
            raise
        except Exception as e:
            what = f"case {case}: {type(e).__name__}: {e}\nbackend {backend!r}\n{source!r:.2000}"
            raise AssertionError(what) from e
    print(f"\n4500 mutated hostfiles in {time.monotonic() - t0:.1f} s: {seen}")
    assert seen["ok"] > 100 and seen["error"] > 1000  # both kinds of outcome are exercised


def test_a_file_that_is_not_utf8_or_cannot_be_read_is_a_hostfile_error(tmp_path):
    path = tmp_path / "hosts.json"
    path.write_bytes(b'[{"ssh": "mac\xff"}]')
    with pytest.raises(HostfileError, match=r"it is not UTF-8 text \(byte 13 is 0xff\)"):
        hf.load(path)
    with pytest.raises(HostfileError, match="doesn't exist"):
        hf.load(tmp_path)  # a directory
