"""Control flow on results: if/elif/else, ternaries, and/or short-circuits, match statements,
assertions."""

import pydron

from .registry import case
from .tasks import Point, add, double, identity, make_dict, make_list, make_point, qr, square


@case([1, 5, 10, 20])
@pydron.schedule
def if_elif_else_on_result(xs):
    out = []
    for x in xs:
        r = square(x)
        if r < 10:
            out.append("small")
        elif r < 200:
            out.append("medium")
        else:
            out.append("large")
    return out


@case(3, 4)
@pydron.schedule
def ternary_on_result(a, b):
    r = add(a, b)
    s = double(r) if r > 5 else square(r)
    return s


@case([0, 1, 2])
@pydron.schedule
def and_or_short_circuit(xs):
    rs = [identity(x) for x in xs]
    first = rs[0] or rs[1] or rs[2]
    both = rs[1] and rs[2]
    neither = not rs[0]
    return first, both, neither, rs[0] and double(99)


@case(5)
@pydron.schedule
def conditional_call(x):
    r = square(x)
    if r > 20:
        r = add(r, double(r))
    return r


@case([0, 3, 7, 12])
@pydron.schedule
def match_literal_and_guard(xs):
    out = []
    for x in xs:
        match square(x):
            case 0:
                out.append("zero")
            case 9 | 49:
                out.append("odd-square")
            case n if n > 100:
                out.append(f"big {n}")
            case other:
                out.append(other)
    return out


@case(4)
@pydron.schedule
def match_sequence_and_mapping(n):
    out = []
    for subject in (make_list(n), make_list(1), make_dict("k", n), qr(17, n)):
        match subject:
            case [single]:
                out.append(("one", single))
            case [first, *rest] if len(rest) > 2:
                out.append(("list", first, rest))
            case {"k": value, **others}:
                out.append(("dict", value, others))
            case (q, r):
                out.append(("pair", q, r))
    return out


@case([(0, 5), (3, 0), (1, 2)])
@pydron.schedule
def match_class_pattern(coords):
    out = []
    for x, y in coords:
        match make_point(x, y):
            case Point(x=0, y=yy):
                out.append(f"on y axis at {yy}")
            case Point(x=xx, y=0):
                out.append(f"on x axis at {xx}")
            case Point() as p:
                out.append(p.norm2())
    return out


@case(3)
@pydron.schedule
def assert_on_result(x):
    r = square(x)
    assert r == 9, "square is wrong"
    return r


@case(3, raises=AssertionError)
@pydron.schedule
def assert_fails_on_result(x):
    r = square(x)
    assert r == 10, f"square of {x} is {r}"
    return r


@case([4, 9, 2])
@pydron.schedule
def comparisons_between_results(xs):
    a, b, c = (square(x) for x in xs)
    return a < b, b > c, a == square(4), a != c, a < b < c, max(a, b) <= c
