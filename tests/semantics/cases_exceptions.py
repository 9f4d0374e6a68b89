"""Exceptions around functional calls: try/except/else/finally, handlers by exact and parent class,
re-raise, uncaught propagation, failures whose result is never read, first failure in program order
wins, exceptions from non-functional code consuming results, with-blocks.

Prints sit before failing calls or in handlers/finally: statements after a failing call, inside its
region, may run early under pydron (the one documented difference), so no case prints there."""

import pydron

from .registry import case
from .tasks import (OtherError, SubTaskError, TaskError, add, divide, double, fail, fail_if,
                    fail_key, fail_sub, slow_fail, square, task_exits, task_interrupts)


@case(3)
@pydron.schedule
def except_exact_class(x):
    try:
        r = fail(x)
    except TaskError as e:
        print("caught", type(e).__name__, e)
        r = -1
    return r


@case(4)
@pydron.schedule
def except_parent_class(x):
    try:
        r = fail_sub(x)
    except TaskError as e:
        print("caught by parent:", type(e).__name__, e.args)
        r = 0
    return r


@case(5)
@pydron.schedule
def except_wrong_class_then_right(x):
    try:
        try:
            r = fail(x)
        except OtherError:
            print("wrong handler")
            r = 1
    except TaskError as e:
        print("outer handler", e)
        r = 2
    return r


@case(6)
@pydron.schedule
def except_tuple_of_classes(x):
    try:
        return fail_key("missing")
    except (OtherError, LookupError) as e:
        return f"{type(e).__name__}: {e}"


@case(2, raises=TaskError)
@pydron.schedule
def reraise_from_handler(x):
    try:
        r = fail(x, "again")
    except TaskError:
        print("re-raising")
        raise
    return r


@case(2, raises=ValueError)
@pydron.schedule
def raise_from_in_handler(x):
    try:
        r = fail(x)
    except TaskError as e:
        raise ValueError(f"wrapped {e}") from e
    return r


@case(7, raises=TaskError)
@pydron.schedule
def uncaught_propagates(x):
    print("before the call")
    a = double(x)
    b = fail(a, "uncaught")
    return add(a, b)


@case(8, raises=TaskError)
@pydron.schedule
def unread_failure_raised_at_return(x):
    print("start")
    fail(x, "never read")
    return double(x)


@case(9, raises=TaskError)
@pydron.schedule
def first_failure_in_program_order_wins(x):
    a = fail(x, "first")
    b = fail(x + 1, "second")
    return add(a, b)


@case([1, 2, 3, 4], raises=TaskError)
@pydron.schedule
def first_failure_among_many(xs):
    rs = [fail_if(x, 3) for x in xs]
    rs.append(fail(99, "later"))
    return rs


@case(3)
@pydron.schedule
def try_else_finally(x):
    log = []
    try:
        r = square(x)
    except TaskError:
        log.append("except")
    else:
        log.append(f"else {r}")
    finally:
        log.append("finally")
        print("finally runs")
    return log


@case(3)
@pydron.schedule
def try_except_finally_failing(x):
    log = []
    try:
        r = fail(x)
    except TaskError as e:
        log.append(f"except {e}")
        r = None
    else:
        log.append("else")
    finally:
        log.append("finally")
    return log, r


@case(4, raises=TaskError)
@pydron.schedule
def finally_runs_on_propagation(x):
    try:
        print("in try")
        return fail(x, "through finally")
    finally:
        print("finally before propagation")


@case([1, 0, 2])
@pydron.schedule
def zero_division_from_task(xs):
    out = []
    for x in xs:
        try:
            out.append(divide(10, x))
        except ZeroDivisionError as e:
            out.append(str(e))
    return out


@case(5, raises=ZeroDivisionError)
@pydron.schedule
def error_in_consumer_of_result(x):
    r = square(x)
    return r // (r - 25)


@case(["1", "x", "3"])
@pydron.schedule
def error_converting_result(xs):
    out = []
    for x in xs:
        r = add(x, "0")
        try:
            out.append(int(r))
        except ValueError as e:
            out.append(str(e))
    return out


@case(3, raises=TaskError)
@pydron.schedule
def earlier_failure_before_try_wins(x):
    a = fail(x, "before try")
    try:
        b = fail(x, "inside try")
    except TaskError as e:
        print("handler", e)
        b = 0
    return a, b


@case(3)
@pydron.schedule
def try_assignment_not_done_on_failure(x):
    r = "unset"
    items = []
    try:
        r = fail(x)
        items.append(r)
    except TaskError:
        pass
    return r, items


@case(3)
@pydron.schedule
def exception_object_attributes(x):
    try:
        fail_sub(x)
    except SubTaskError as e:
        return type(e).__name__, e.args, isinstance(e, TaskError), e.__class__.__mro__[1].__name__
    return None


@case([1, 2, 3, 4])
@pydron.schedule
def handler_in_loop(xs):
    out = []
    for x in xs:
        try:
            out.append(fail_if(x, 2))
        except TaskError as e:
            out.append(str(e))
            continue
        out.append("ok")
    return out


class Tracked:
    """A user context manager that prints on enter and exit (and what it saw)."""

    def __init__(self, name, suppress=False):
        self.name = name
        self.suppress = suppress

    def __enter__(self):
        print("enter", self.name)
        return self

    def __exit__(self, exc_type, exc, tb):
        print("exit", self.name, exc_type.__name__ if exc_type else None, exc)
        return self.suppress


@case([1, 2, 3])
@pydron.schedule
def with_block_around_calls(xs):
    with Tracked("outer") as t:
        rs = [square(x) for x in xs]
        with Tracked("inner"):
            s = add(rs[0], rs[-1])
    return t.name, rs, s


@case(3)
@pydron.schedule
def with_block_suppresses_task_error(x):
    r = "unset"
    with Tracked("suppressing", suppress=True):
        r = fail(x, "in with")
    print("after with", r)
    return r


@case(3, raises=TaskError)
@pydron.schedule
def with_block_sees_task_error(x):
    with Tracked("not suppressing"):
        r = fail(x, "escapes with")
    return r


@case(1, raises=TaskError)
@pydron.schedule
def first_in_program_order_not_first_in_time(x):
    slow = slow_fail(x, 0.3)       # fails last in time, but first in program order
    fast = fail(x, "fast")
    return [slow, fast]


@case(2)
@pydron.schedule
def handler_catches_program_order_first(x):
    try:
        a = slow_fail(x, 0.2)
        b = fail(x, "fast")
        return a, b
    except TaskError as e:
        return str(e)


@case(3)
@pydron.schedule
def return_inside_finally_overrides(x):
    try:
        return fail(x)
    finally:
        return "finally wins"


@case([1, 2, 3])
@pydron.schedule
def comprehension_inside_try(xs):
    # 3.12 inlines comprehensions with compiler-made exception regions: not a user try.
    try:
        rs = [fail_if(x, 2) for x in xs]
        ok = False
    except TaskError as e:
        rs = str(e)
        ok = True
    return rs, ok, [square(x) for x in xs]


@case([1, 2, 3])
@pydron.schedule
def genexpr_inside_try(xs):
    try:
        return sum(fail_if(x, 3) for x in xs)
    except TaskError as e:
        return f"caught {e}"


@case([1, 2, 3, 4, 5])
@pydron.schedule
def break_and_continue_through_finally(xs):
    log = []
    for x in xs:
        try:
            r = square(x)
            if r == 4:
                continue
            if r > 10:
                break
            log.append(r)
        finally:
            log.append(f"finally {x}")
    return log


@case([1, 2, 3])
@pydron.schedule
def return_inside_with(xs):
    with Tracked("returning"):
        rs = [double(x) for x in xs]
        return rs, add(rs[0], rs[1])


@case([1, 2, 3, 4])
@pydron.schedule
def generator_with_try_inside(xs):
    def checked():
        for x in xs:
            try:
                yield fail_if(x, 3)
            except TaskError as e:
                yield f"skipped: {e}"

    return list(checked())


@case(2)
@pydron.schedule
def nested_try_in_handler(x):
    try:
        fail(x, "outer")
    except TaskError as outer:
        try:
            r = fail_sub(x)
        except SubTaskError as inner:
            return f"{outer} / {inner}", isinstance(inner.__context__, TaskError)
    return None


@case(3, raises=TaskError)
@pydron.schedule
def failure_inside_nested_scheduled(x):
    return add(scheduled_may_fail(x), 1)


@pydron.schedule
def scheduled_may_fail(x):
    r = square(x)
    return fail_if(r, 9)


@case([2, 3, 4])
@pydron.schedule
def nested_scheduled_failure_caught(xs):
    out = []
    for x in xs:
        try:
            out.append(scheduled_may_fail(x))
        except TaskError as e:
            out.append(str(e))
    return out


@case(1, raises=TaskError)
@pydron.schedule
def earlier_task_failure_beats_later_plain_error(x):
    a = slow_fail(x, 0.2)          # plain Python raises this before reaching the next line
    b = int("not a number")        # a non-functional error that pydron meets first in time
    return a, b


@case(2, raises=TaskError)
@pydron.schedule
def earlier_task_failure_beats_later_raise(x):
    a = slow_fail(x, 0.2)
    raise OtherError(f"raised after the call {x}")


@case(3)
@pydron.schedule
def task_raising_system_exit(x):
    try:
        task_exits(x)
    except SystemExit as e:
        return "exit", e.code
    return None


@case(4)
@pydron.schedule
def task_raising_keyboard_interrupt(x):
    try:
        task_interrupts(x)
    except KeyboardInterrupt as e:
        return "interrupted", str(e)
    return None
