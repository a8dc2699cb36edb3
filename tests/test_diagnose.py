"""Pure diagnosis and output rules, without a cluster: what a failed cell says, how rank output reads."""

from __future__ import annotations

from mlx_nb import diagnose
from mlx_nb.diagnose import Recovery, Stop, Stopped
from mlx_nb.output import Printer, visible
from mlx_nb.results import Call, InitStep, Outcome, RankError, Trace


def _err(type_="ValueError", message="no", at=1.0, **kw) -> RankError:
    return RankError(type_, message, f"Traceback\n{type_}: {message}", at, **kw)


def _waiting(op="all_sum", seq=1, peer=None, line=3) -> Trace:
    return Trace(pending=[Call(seq, op, (4,), "float32", peer)], n_pending=1, in_eval=True, line=line)


# ------------------------------------------------------------------ diagnose
def test_ranges_and_labels_read_like_the_notebook_shows_them():
    assert diagnose.ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert diagnose.label([3]) == "[rank 3]" and diagnose.label([0, 1, 2, 3]) == "[ranks 0-3]"


def test_a_group_collective_is_stuck_once_any_rank_has_stopped():
    traces = {0: _waiting(), 1: _waiting()}
    assert diagnose.stuck(3, {}, traces) == []
    assert diagnose.stuck(3, {2: Outcome(2)}, traces) == [0, 1]


def test_a_recv_is_stuck_only_when_its_peer_has_stopped():
    traces = {1: _waiting("recv", peer=0)}
    assert diagnose.stuck(3, {2: Outcome(2)}, traces) == []
    assert diagnose.stuck(3, {0: Outcome(0)}, traces) == [1]


def test_root_cause_is_lost_then_earliest_real_error_then_the_straggler():
    lost = [Outcome(0, error=_err(at=1.0)), Outcome(1, lost=True)]
    assert diagnose.root_cause(lost) == 1
    # a rank that raised because its peer went away is a consequence, not a cause
    errors = [Outcome(0, error=_err(at=1.0, peer_lost=True)), Outcome(1, error=_err(at=2.0))]
    assert diagnose.root_cause(errors) == 1
    straggler = [Outcome(0, blocked=True), Outcome(1, error=_err("KeyboardInterrupt", "", interrupted=True))]
    assert diagnose.root_cause(straggler) == 1


def test_report_leads_with_the_root_cause_and_gives_every_other_rank_one_line():
    outcomes = [
        Outcome(0, blocked=True, trace=_waiting(line=3)),
        Outcome(1, error=_err(lineno=2, line="raise ValueError('no')")),
        Outcome(2),
    ]
    text, root = diagnose.cell_report(
        outcomes, Stopped(Stop.RANK_FAILED), Recovery(restarted=True, seconds=3.1, ranks=3)
    )
    lines = text.splitlines()
    assert root == 1
    assert lines[0] == "Root cause: rank 1 raised ValueError: no, line 2: raise ValueError('no')"
    assert "  rank 0: blocked in a collective: all_sum #1 (shape (4,), float32) at line 3" in lines
    assert "  rank 2: finished" in lines
    assert lines[-1].startswith("The group could not go on, so all 3 ranks were restarted (3.1 s)")


def test_the_same_error_everywhere_is_one_line_and_nothing_restarts():
    outcomes = [Outcome(r, error=_err(lineno=1)) for r in range(4)]
    text, root = diagnose.cell_report(outcomes)
    assert text.splitlines()[0] == "[ranks 0-3] all raised ValueError: no"
    assert text.endswith("no restart was needed: the ranks and their state are kept.")


def test_a_timeout_names_itself_first_and_a_failed_restart_says_what_to_do():
    outcomes = [Outcome(0, blocked=True, trace=_waiting()), Outcome(1)]
    text, _ = diagnose.cell_report(outcomes, Stopped(Stop.TIMEOUT, 2), Recovery(error="port in use", ranks=2))
    assert text.startswith("%%mlx_dist: --timeout 2 s expired.\n")
    assert "Restarting the cluster failed: port in use\nThe next cell tries again" in text


def test_init_messages_name_the_ranks_and_the_port():
    stuck = diagnose.init_stuck("ring", 5, {1: None, 2: InitStep.JOINING}, ["a", "b", "c"])
    assert stuck == (
        "mx.distributed.init(backend='ring') did not complete within 5 s: rank(s) 1 never called it "
        "(its engine is not responding); rank(s) 2 waited for it in the ring."
    )
    failed = diagnose.init_failed(
        2, _err("RuntimeError", "[ring] Couldn't bind", port_in_use=True), "127.0.0.1:4242", False
    )
    assert "port 4242 on 127.0.0.1, rank 2's address in the ring, is in use by another process" in failed


# ------------------------------------------------------------------ output
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _printer(show, window=0.5):
    out, clock = [], _Clock()
    return Printer(show, write=lambda stream, text: out.append(text), window=window, clock=clock), out, clock


def test_identical_lines_that_arrive_together_are_merged_in_rank_order():
    p, out, _ = _printer([0, 1, 2])
    for r in (2, 0, 1):
        p.feed(r, "stdout", f"same\nmine is {r}\n")
    assert "".join(out).splitlines() == [
        "[ranks 0-2] same",
        "[rank 0] mine is 0",
        "[rank 1] mine is 1",
        "[rank 2] mine is 2",
    ]


def test_a_quiet_rank_holds_lines_back_for_the_window_only():
    p, out, clock = _printer([0, 1])
    p.feed(0, "stdout", "tick 1\n")
    assert out == []  # rank 1 may still print the same line
    clock.now += 0.6
    p.flush_due()
    assert out == ["[rank 0] tick 1\n"]
    p.feed(0, "stdout", "tick 2\n")  # rank 1 is behind now: nobody waits for it
    assert out[-1] == "[rank 0] tick 2\n"


def test_lines_that_arrive_apart_are_not_merged():
    p, out, clock = _printer([0, 1])
    p.feed(0, "stdout", "done\n")
    clock.now += 0.6
    p.flush_due()
    p.feed(1, "stdout", "done\n")
    assert out == ["[rank 0] done\n", "[rank 1] done\n"]


def test_one_shown_rank_passes_carriage_returns_through_and_drops_ring_noise():
    p, out, _ = _printer([0])
    for text in ("loading  10%\r", "loading 100%\r", "weights ready, 42 layers\n", "answer: 7\n"):
        p.feed(0, "stdout", text)
    assert "".join(out) == "loading  10%\rloading 100%\rweights ready, 42 layers\nanswer: 7\n"
    p.feed(0, "stderr", "[ring] Peer went away\n 10%|#\r 20%|##")
    p.finish(0)
    assert "".join(out).endswith("answer: 7\n 10%|#\r 20%|##")  # the bar, live; not the noise


def test_labelled_progress_lines_show_their_final_state_and_lose_nothing_after():
    assert visible("loading  10%\rloading 100%\rweights ready, 42 layers") == "weights ready, 42 layers"
    assert visible("done\r\n") == "done\n"
    p, out, _ = _printer([0, 1])
    for r in (0, 1):
        p.feed(r, "stdout", "loading  10%\rloading 100%\rweights ready\nanswer: 7\n")
    assert "".join(out).splitlines() == ["[ranks 0-1] weights ready", "[ranks 0-1] answer: 7"]
