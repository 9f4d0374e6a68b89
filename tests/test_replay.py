"""Replay (issue 8): the second and later calls of a scheduled function run its graph instead of
its bytecode. Every result is compared with plain Python's run of the same code; the counters
show the graph really ran (or gave up to the trace, where that is the point)."""

import random
import sys
import time

import numpy as np
import pytest

import pydron
from pydron import _core, _replay

from helpers import module_pool
from replay_cases import (branch_on_results, calls_plain_helper, divides, fails_on, inc, inner,
                          plain_helper, side_effects)

pool, plain = module_pool(workers=2, replay="on")


@pytest.fixture(autouse=True)
def fresh():
    """Graphs made afresh by each test, from the second call (the default)."""
    previous = _core._replay_configure(mode="on", after=1, compare=0)
    for fn in SCHEDULED + _more_scheduled():
        _core._replay_forget(fn)
    yield
    _core._replay_configure(mode=previous["mode"], after=previous["after"],
                            compare=previous["compare"])


def replayed(fn, *args):
    """fn(*args) twice: traced, then through its graph; the second result, and whether the
    graph ran to the end."""
    fn(*args)
    hits = _core._replay_stats()["hits"]
    out = fn(*args)
    return out, _core._replay_stats()["hits"] > hits


# ---- functions under test --------------------------------------------------------------------

@pydron.functional
def square(x):
    return x * x


@pydron.functional
def other_inc(x):
    return x + 100


OFFSET = 10


@pydron.schedule
def comprehension(xs):
    return [inc(x) for x in xs]


@pydron.schedule
def loop_with_globals(xs):
    total = 0
    out = []
    for x in xs:
        r = inc(x)
        out.append(r)
        total += x
    return out, total + OFFSET


@pydron.schedule
def calls_global_callee(xs):
    return [callee(x) for x in xs]


callee = inc


@pydron.schedule
def filter_on_results(xs):
    return [x for x in xs if square(x) > 10]


@pydron.schedule
def map_with_failure(xs, bad):
    return [fails_on(x, bad) for x in xs]


@pydron.schedule
def extends_argument(lst):
    lst += [inc(1)]
    return len(lst)


@pydron.schedule
def consumes(it):
    out = []
    for x in it:
        out.append(inc(x))
    return out


@pydron.schedule
def numpy_pipeline(images):
    out = [square(im) for im in images]
    total = np.zeros_like(images[0])
    for r in out:
        total += r
    return np.stack(out).mean(axis=0), total


@pydron.schedule
def outer(xs):
    return [inner(x) for x in xs]


@pydron.schedule
def while_loop(n):
    x = n
    steps = 0
    while x > 1:
        x = square(x) % 7 if steps < 3 else 1
        steps += 1
    return x, steps


@pydron.schedule
def builds_things(xs, label):
    d = {}
    for i, x in enumerate(xs):
        d[f"{label}-{i}"] = inc(x)
    s = {x % 3 for x in xs}
    return d, s, [v for v in d.values()], label.upper()


SCHEDULED = [comprehension, loop_with_globals, calls_global_callee, branch_on_results,
             filter_on_results, map_with_failure, divides, calls_plain_helper, extends_argument,
             consumes, numpy_pipeline, inner, outer, while_loop, builds_things]


def _more_scheduled():
    return [logged_branch, compares_unbound, subscripts_unbound, keeps_large_squares]


# ---- the program format --------------------------------------------------------------------------

def test_c_and_python_agree_on_the_operations():
    assert _core._replay_ops() == tuple(_replay.OPS)


def test_a_second_call_replays_and_returns_what_plain_python_does():
    out, ran = replayed(comprehension, list(range(50)))
    assert ran
    assert out == plain(comprehension, list(range(50)))
    state = _core._replay_state(comprehension)
    assert state["state"] == "ready" and state["hits"] == 1 and state["traced"] == 1


# ---- guards: what decided a trace changes, the graph still computes plain Python's result -------

@pytest.mark.parametrize("args", [
    ([1, 2, 3],), ([1.5, 2.5],), ([],), (list(range(1000)),), ((1, 2),), (range(5),),
    ([np.int64(3), np.float32(2.0)],), ([True, False],)])
def test_new_argument_types_and_lengths(args):
    comprehension([0])                      # the graph exists, made from other arguments
    out, ran = replayed(comprehension, *args)
    assert ran
    assert out == plain(comprehension, *args)


def test_a_changed_global_is_read_again():
    global OFFSET
    first, _ = replayed(loop_with_globals, [1, 2, 3])
    OFFSET = 1000
    try:
        out, ran = replayed(loop_with_globals, [1, 2, 3])
        assert ran
        assert out == plain(loop_with_globals, [1, 2, 3]) == ([2, 3, 4], 1006)
    finally:
        OFFSET = 10
    assert first == ([2, 3, 4], 16)


def test_a_rebound_functional_callee_is_called():
    global callee
    assert replayed(calls_global_callee, [1, 2]) == ([2, 3], True)
    callee = other_inc
    try:
        out, ran = replayed(calls_global_callee, [1, 2])
        assert ran and out == [101, 102]
        callee = plain_helper              # not functional: the graph gives up, before calling
        side_effects.clear()
        assert calls_global_callee([5, 6]) == [5, 6]
        assert side_effects == [5, 6]      # called once each, by the trace
    finally:
        callee = inc


# ---- never a side effect twice, never a change to what the caller owns --------------------------

def test_a_plain_callee_makes_the_graph_give_up_before_calling_it():
    side_effects.clear()
    for i in range(5):
        assert calls_plain_helper(i) == i + 1
    assert side_effects == [1, 2, 3, 4, 5]
    state = _core._replay_state(calls_plain_helper)
    assert state["bails"] >= 1 and "plain_helper" in state["reason"]


def test_a_graph_that_always_gives_up_is_dropped():
    for i in range(8):
        calls_plain_helper(i)
    assert _core._replay_state(calls_plain_helper)["state"] == "given up"


def test_an_argument_changed_in_place_is_changed_once():
    lst = [0]
    extends_argument(lst)
    lst2 = [0]
    assert extends_argument(lst2) == 2
    assert lst2 == [0, 2]
    assert "in place" in _core._replay_state(extends_argument)["reason"]


def test_an_iterator_argument_is_consumed_once():
    consumes(iter([1]))
    out = consumes(iter([1, 2, 3]))
    assert out == [2, 3, 4]
    assert "iterator" in _core._replay_state(consumes)["reason"]


# ---- exceptions: what plain Python raises, from the trace ----------------------------------------

def test_an_error_in_the_graph_is_raised_by_the_trace():
    divides([1, 2], 1)
    with pytest.raises(ZeroDivisionError) as info:
        divides([1, 2], 0)
    assert any(f.name == "divides" for f in info.traceback), "the scheduled function's frame"


@pydron.schedule
def compares_unbound(x, bind):
    r = inc(1)
    if bind:
        y = r
    return x < y


@pydron.schedule
def subscripts_unbound(x, bind):
    r = inc(1)
    if bind:
        y = r
    return x[y]


class Operand:
    """Compares and subscripts without failing: only the unbound name makes the call raise."""

    def __lt__(self, other):
        return True

    def __getitem__(self, key):
        return key


@pytest.mark.parametrize("fn", [compares_unbound, subscripts_unbound])
def test_a_second_operand_without_value_gives_up_and_keeps_no_reference_to_the_first(fn):
    """The graph gives up when the second operand of a comparison or subscript has no value; the
    first, already read, is let go (the trace then raises plain Python's UnboundLocalError)."""
    x = Operand()
    for _ in range(3):
        assert fn(x, True) == plain(fn, x, True)
    refs = sys.getrefcount(x)
    for _ in range(3):
        with pytest.raises(UnboundLocalError):
            fn(x, False)
    assert _core._replay_state(fn)["bails"] >= 1, "the graph ran and gave up"
    assert sys.getrefcount(x) == refs


@pytest.mark.parametrize("bad", [{0}, {7}, {999}, {3, 500}])
def test_a_failure_inside_a_batch_is_the_earliest_one(bad):
    xs = list(range(1000))
    map_with_failure(xs, frozenset())                 # the graph exists
    with pytest.raises(ValueError) as info:
        map_with_failure(xs, frozenset(bad))
    assert str(info.value) == f"bad element {min(bad)}"
    assert map_with_failure(xs, frozenset()) == xs    # the pool is fine afterwards


# ---- batching -------------------------------------------------------------------------------------

def test_a_comprehension_is_sent_as_a_few_chunk_tasks():
    xs = list(range(2000))
    comprehension(xs)
    before = pydron.stats()["submitted"]
    out, ran = replayed(comprehension, xs)
    assert ran and out == [x + 1 for x in xs]
    # the second call's tasks: far fewer than one per element
    assert pydron.stats()["submitted"] - before < 2000 + 100
    assert _core._replay_stats()["maps"] >= 1


# ---- speculation ------------------------------------------------------------------------------------

def test_guesses_past_pending_branches_give_plain_results():
    xs = list(range(8))
    branch_on_results(xs)
    stats = _core._replay_stats()
    out, ran = replayed(branch_on_results, xs)
    assert ran and out == plain(branch_on_results, xs)
    after = _core._replay_stats()
    assert after["guesses"] > stats["guesses"], "no branch was guessed"
    assert after["mispredicts"] > stats["mispredicts"], "x < 4 goes the other way: some miss"


def test_wrong_guesses_reuse_the_tasks_of_the_right_path(tmp_path):
    """After a wrong guess the right path makes the same calls again: their tasks are taken
    back, not made twice. Each logged_square call leaves a line in a file (a test's window into
    the workers)."""
    global LOG
    xs = list(range(8))
    expected = plain(logged_branch, xs)
    LOG = str(tmp_path / "calls.log")
    try:
        assert logged_branch(xs) == logged_branch(xs) == expected   # traced, then the graph
        open(LOG, "w").close()
        mis = _core._replay_stats()["mispredicts"]
        assert logged_branch(xs) == expected
        assert _core._replay_stats()["mispredicts"] > mis, "x < 4 goes the other way: some miss"
        with open(LOG) as f:
            calls = sorted(int(line) for line in f)
        assert calls == xs, "every square was computed once, on the right path or reused"
    finally:
        LOG = None


LOG = None


@pydron.functional
def logged_square(x, log):
    time.sleep(0.02)
    if log:
        with open(log, "a") as f:
            f.write(f"{x}\n")
    return x * x


@pydron.schedule
def logged_branch(xs):
    out = []
    for x in xs:
        r = logged_square(x, LOG)
        if r > 10:
            out.append(inc(r))
        else:
            out.append(-1)
    return out


def test_random_inputs_with_guesses():
    rng = random.Random(1234)
    for _ in range(150):
        xs = [rng.randint(0, 6) for _ in range(rng.randint(0, 9))]
        if rng.random() < 0.3:
            _core._replay_forget(filter_on_results)
        assert filter_on_results(xs) == [x for x in xs if x * x > 10], xs


def test_a_site_that_guesses_wrong_too_often_stops_guessing():
    # guess=2: the branch guesses even when the result is already in (whether a tiny task's
    # result has arrived by the time the branch reads it depends on the machine's load)
    _core._replay_configure(guess=2)
    try:
        for i in range(12):
            xs = [1, 5] if i % 2 else [5, 1]      # the outcomes alternate: half the guesses miss
            assert filter_on_results(xs) == [x for x in xs if x * x > 10]
    finally:
        _core._replay_configure(guess=1)
    site = _core._replay_state(filter_on_results)["sites"][0]
    assert site["guesses"] > 0 and site["misses"] >= 4, site
    assert site["guessing"] is False, site


@pydron.schedule
def keeps_large_squares(xs):
    out = []
    for x in xs:
        r = square(x)
        if r > 10:
            out.append(inc(r))
        else:
            out.append(-x)
    return out


SPECULATION = ("guesses", "speculative_tasks", "dropped_tasks", "reused_tasks")


def speculation_counts():
    stats = _core._replay_stats()
    return {k: stats[k] for k in SPECULATION}


def test_a_site_that_starts_to_miss_stops_guessing_within_a_few_calls():
    """A site's recent guesses decide, not its whole life: after 240 guesses that held, the
    outcomes start to alternate, and within a few calls the site stops guessing; from then on
    no call guesses, submits a task on a guess, drops or takes back one."""
    alternating = [5, 1] * 4
    expected = plain(keeps_large_squares, alternating)
    _core._replay_configure(guess=2)       # guesses even when the result is in: no race
    try:
        steady = [5] * 8
        for _ in range(30):
            assert keeps_large_squares(steady) == [26] * 8
        site = _core._replay_state(keeps_large_squares)["sites"][0]
        assert site["guessing"] is True and site["misses"] == 0 and site["guesses"] >= 200, site
        before = speculation_counts()
        for calls in range(1, 5):
            assert keeps_large_squares(alternating) == expected
            if not _core._replay_state(keeps_large_squares)["sites"][0]["guessing"]:
                break
        site = _core._replay_state(keeps_large_squares)["sites"][0]
        assert site["guessing"] is False and site["stops"] == 1, (calls, site)
        assert 4 <= site["misses"] < 16, site
        stopped = speculation_counts()
        assert stopped["speculative_tasks"] > before["speculative_tasks"], "it did speculate"
        for _ in range(5):
            assert keeps_large_squares(alternating) == expected
        assert speculation_counts() == stopped, "a stopped site still speculated"
        assert _core._replay_state(keeps_large_squares)["hits"] == 29 + calls + 5, "replayed"
    finally:
        _core._replay_configure(guess=1)


def test_a_stopped_site_guesses_again_once_its_branch_holds_steady():
    """While a stopped site waits, what it would have guessed is checked: a run of outcomes
    that a guess would have got right turns guessing back on."""
    alternating = [5, 1] * 4
    expected = plain(keeps_large_squares, alternating)
    _core._replay_configure(guess=2)
    try:
        for _ in range(6):
            assert keeps_large_squares(alternating) == expected
        assert _core._replay_state(keeps_large_squares)["sites"][0]["guessing"] is False
        resumed = _core._replay_stats()["sites_resumed"]
        assert keeps_large_squares([5] * 20) == [26] * 20    # 19 would-be guesses hold
        site = _core._replay_state(keeps_large_squares)["sites"][0]
        assert site["guessing"] is True, site
        assert _core._replay_stats()["sites_resumed"] == resumed + 1
        before = speculation_counts()
        assert keeps_large_squares([5] * 8) == [26] * 8
        after = speculation_counts()
        assert after["guesses"] > before["guesses"], "guessing again"
        assert after["speculative_tasks"] > before["speculative_tasks"]
    finally:
        _core._replay_configure(guess=1)


def test_a_loop_whose_condition_reads_results():
    for n in (2, 3, 5, 9):
        assert while_loop(n) == plain(while_loop, n)
    assert _core._replay_state(while_loop)["hits"] >= 2


# ---- what scientists write --------------------------------------------------------------------------

def test_numpy_pipeline_with_in_place_accumulation():
    images = [np.full((4, 4), float(i)) for i in range(6)]
    out, ran = replayed(numpy_pipeline, images)
    expected = plain(numpy_pipeline, images)
    assert ran
    assert np.array_equal(out[0], expected[0]) and np.array_equal(out[1], expected[1])
    assert all(np.array_equal(im, np.full((4, 4), float(i))) for i, im in enumerate(images))


def test_nested_scheduled_calls_replay_too():
    out, ran = replayed(outer, [1, 2, 3])
    assert ran and out == [4, 6, 8]
    assert _core._replay_state(inner)["state"] == "ready"


def test_dicts_sets_fstrings_and_methods():
    out, ran = replayed(builds_things, [3, 4, 5], "run")
    assert ran
    assert out == plain(builds_things, [3, 4, 5], "run")


# ---- the reference interpreter -------------------------------------------------------------------

@pytest.mark.parametrize("fn, args", [
    (comprehension, ([1, 2, 3],)), (loop_with_globals, ([4, 5],)),
    (branch_on_results, ([1, 5, 2],)), (builds_things, ([1, 2], "x")), (outer, ([1, 2],)),
    (while_loop, (5,))])
def test_the_reference_interpreter_gives_the_same_results(fn, args):
    _core._replay_configure(mode="reference", after=0)
    for f in SCHEDULED:
        _core._replay_forget(f)
    hits = _core._replay_stats()["hits"]
    out = fn(*args)
    assert _core._replay_stats()["hits"] > hits
    assert out == plain(fn, *args)


# ---- no leaks ---------------------------------------------------------------------------------------

def test_replays_leave_no_pending_value_behind():
    for _ in range(3):
        branch_on_results([1, 5, 2])
        comprehension(list(range(300)))
    live = pydron.stats()["live"]
    for _ in range(20):
        branch_on_results([1, 5, 2])
        comprehension(list(range(300)))
        filter_on_results([1, 5, 2, 6])
    assert pydron.stats()["live"] <= live


# ---- explain ----------------------------------------------------------------------------------------

def test_explain_names_the_reason_and_each_call_site():
    text = str(pydron.explain(calls_plain_helper, 3))
    assert "plain_helper" in text and "neither functional nor known to be pure" in text
    text = str(pydron.explain(comprehension, [1, 2]))
    assert "replays" in text and "inc" in text and "functional" in text


def test_explain_of_a_function_without_graph():
    @pydron.schedule
    def prints(x):
        print(inc(x))

    text = str(pydron.explain(prints))
    assert "print" in text and "no graph" in text


# ---- the graph against its trace -------------------------------------------------------------

@pydron.schedule
def glue(n):
    """Much pure-Python work in the scheduled function, one task: CPython runs the rewritten
    bytecode faster than the graph's interpreter does."""
    acc = 0
    for i in range(n):
        acc = (acc * 31 + i) % 1000003
    return inc(acc)


def test_a_graph_slower_than_its_trace_is_set_aside_and_compared_again():
    _core._replay_configure(compare=1)
    _core._replay_forget(glue)
    expected = plain(glue, 20000)
    for _ in range(8):
        assert glue(20000) == expected
    state = _core._replay_state(glue)
    assert state["state"] == "slower than its trace", state
    assert state["master_cpu"]["replay_us"] > state["master_cpu"]["trace_us"]
    assert "slower than its trace" in state["reason"]
    hits = state["hits"]
    for _ in range(10):
        assert glue(20000) == expected
    assert _core._replay_state(glue)["hits"] == hits, "set aside: the calls are traced"
    for _ in range(64):
        glue(10)
    assert _core._replay_state(glue)["hits"] > hits, "compared again after 64 calls"


@pydron.functional
def first_of(pair):
    if pair is None:
        raise LookupError("no pair")
    return pair[0]


@pydron.schedule
def firsts(pairs):
    return [first_of(p) for p in pairs]


@pytest.mark.parametrize("pairs", [
    [(i, -i) for i in range(600)],                       # tuples: one argument each, not two
    [[i, "x"] for i in range(300)] + [(1,), "ab", b"cd"],
    [(i,) for i in range(50)] + [None] + [(i,) for i in range(50)] + [None],
], ids=["tuples", "mixed", "fails"])
def test_a_replayed_map_of_a_one_argument_function(pairs):
    """A comprehension calling a one-argument function is sent as chunks of values, one
    argument each (no tuple per call): what each call receives, the results, and the earliest
    failure are plain Python's."""
    def outcome(run):
        try:
            return ("returned", run())
        except Exception as e:  # noqa: BLE001 — the exception is part of the outcome
            return ("raised", type(e).__name__, str(e))

    _core._replay_forget(firsts)
    expected = outcome(lambda: plain(firsts, pairs))
    maps = _core._replay_stats()["maps"]
    for _ in range(8):
        assert outcome(lambda: firsts(pairs)) == expected
    assert _core._replay_state(firsts)["hits"] >= 4
    assert _core._replay_stats()["maps"] > maps


def test_a_clear_win_is_compared_again_less_and_less_often():
    """Each comparison traces a few calls: after one where the graph cost at most a third of
    its trace, the next comes after twice as many calls (up to 4096); after a closer one, after
    64 again."""
    _core._replay_configure(compare=1)
    _core._replay_forget(comprehension)
    xs = list(range(3000))
    expected = [x + 1 for x in xs]
    seen = []
    for _ in range(3):
        before = _core._replay_state(comprehension)
        every = before.get("master_cpu", {}).get("recompare_every", 64) or 64
        misses = _core._replay_stats()["misses"]
        for _ in range(every + 8):                  # through the next comparison
            assert comprehension(xs) == expected
        cpu = _core._replay_state(comprehension)["master_cpu"]
        clear = cpu["replay_us"] * 3 <= cpu["trace_us"]
        assert cpu["recompare_every"] == (min(every * 2, 4096) if clear else 64), cpu
        # the calls traced in between: the comparison's own (3), and the first calls'
        traced = _core._replay_stats()["misses"] - misses
        assert traced <= 3 + (8 if not seen else 0), traced
        seen.append(cpu["recompare_every"])
    assert seen == sorted(seen)


def test_a_graph_of_many_tasks_beats_its_trace_and_stays():
    _core._replay_configure(compare=1)
    xs = list(range(3000))
    for _ in range(8):
        assert comprehension(xs) == [x + 1 for x in xs]
    state = _core._replay_state(comprehension)
    assert state["state"] == "ready", state
    assert state["master_cpu"]["replay_us"] < state["master_cpu"]["trace_us"]
