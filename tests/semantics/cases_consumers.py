"""Consumers that break naive lazy proxies: type(), is, isinstance(), id(), C builtins that take
exact types (str.join, json.dumps, struct.pack, pickle), formatting (f-strings, %, str.format),
sorted/min/max/sum, print of nested containers, operators, hashing, conversions."""

import copy
import json
import math
import operator
import pickle
import struct

import pydron

from .registry import case
from .tasks import (Point, add, double, halve, identity, label, make_dict, make_list, make_point,
                    maybe_none, nothing, pair, square)


@case([1, 2.5, "s", None, (1,)])
@pydron.schedule
def type_of_results(values):
    rs = [identity(v) for v in values]
    return [type(r).__name__ for r in rs], type(rs[0]) is int, type(rs[1]) == float, type(rs[4])


@case([0, 1, 2, 3])
@pydron.schedule
def is_none_checks(xs):
    rs = [maybe_none(x) for x in xs]
    n = nothing(5)
    return [r is None for r in rs], n is None, n is not None, rs[1] is None or rs[0]


@case([1, "a", 2.0, [1], {"k": 1}])
@pydron.schedule
def isinstance_checks(values):
    rs = [identity(v) for v in values]
    return ([isinstance(r, int) for r in rs], [isinstance(r, (list, dict)) for r in rs],
            isinstance(rs[2], float), issubclass(type(rs[3]), list))


@case(4)
@pydron.schedule
def identity_checks(x):
    r = make_list(x)
    r2 = r
    other = make_list(x)
    holder = [r, other]
    n = nothing(x)
    return (r is r2, r is other, holder[0] is r2, id(r) == id(r2), id(holder[1]) == id(other),
            r == other, n is None, nothing(1) is n)


@case([3, 1, 2])
@pydron.schedule
def join_results(xs):
    labels = [label(x) for x in xs]
    return ",".join(labels), "-".join(sorted(labels)), "".join(label(x) for x in xs)


@case([1, 2, 3])
@pydron.schedule
def json_dumps_results(xs):
    rs = [square(x) for x in xs]
    doc = {"values": rs, "nested": {"d": make_dict("k", xs[0]), "t": (label(1), halve(3))}}
    return json.dumps(rs), json.dumps(doc, sort_keys=True), json.loads(json.dumps(doc))


@case([1.5, 2.5, 3.5])
@pydron.schedule
def struct_pack_results(xs):
    rs = [halve(x) for x in xs]
    packed = struct.pack("3d", *rs)
    ints = struct.pack("<2i", square(3), double(4))
    return packed, struct.unpack("3d", packed), ints


@case(7)
@pydron.schedule
def fstrings(x):
    r = square(x)
    h = halve(x)
    s = label(x)
    return [f"{r}", f"{r:5d}|{h:.3f}|{s!r}|{s:>10}", f"{r=}", f"{[r, h]}", f"{r + 1:x}"]


@case(7)
@pydron.schedule
def percent_format(x):
    r = square(x)
    h = halve(x)
    s = label(x)
    return ["%d" % r, "%s and %r" % (s, s), "%5.2f%%" % h, "%(a)s-%(b)d" % {"a": s, "b": r},
            b"%d" % r]


@case(7)
@pydron.schedule
def str_format_method(x):
    r = square(x)
    h = halve(x)
    s = label(x)
    return ["{} {}".format(r, s), "{0:>6}|{1:.1e}".format(r, h), "{name}".format(name=s),
            "{0[1]}".format([r, s]), format(h, "08.3f"), str(r), repr(s)]


@case([5, -3, 8, 1])
@pydron.schedule
def sorted_min_max_sum(xs):
    rs = [double(x) for x in xs]
    return (sorted(rs), sorted(rs, reverse=True), min(rs), max(rs), sum(rs), sum(rs, 100),
            min(rs[0], rs[1]), max(*rs), sorted(rs, key=abs))


@case([1, 2, 3])
@pydron.schedule
def print_results(xs):
    rs = [square(x) for x in xs]
    print(rs)
    print({"a": rs, "b": (rs[0], [label(1), {"c": halve(3)}])})
    print(*rs, sep=",", end=";\n")
    print(make_point(1, 2), nothing(0))
    return len(rs)


@case([4, 9])
@pydron.schedule
def arithmetic_and_math(xs):
    a, b = (square(x) for x in xs)
    h = halve(b)
    return (a + b, a - b, a * b, a / b, a // 3, a % 5, a ** 2, -a, +h, abs(-a), ~a, a << 2,
            a & b, a | b, a ^ b, divmod(b, a), round(h), round(h, 1), math.sqrt(a), int(h),
            float(a), complex(a, 1), operator.add(a, b))


@case([2, 3])
@pydron.schedule
def sequence_operators(xs):
    l1 = make_list(xs[0])
    l2 = make_list(xs[1])
    s = label(xs[0])
    return l1 + l2, l1 * 2, s * 2, s + "!", 1 in l1, s in ["item-2"], l2[1:], "tem" in s


@case(5)
@pydron.schedule
def truthiness_and_bool(x):
    zero = identity(0)
    empty = make_list(0)
    r = square(x)
    return bool(r), bool(zero), not empty, bool(empty or r), [1 for _ in range(r) if zero]


@case(3)
@pydron.schedule
def hashing_results(x):
    s = label(x)
    t = pair(x, s)
    return hash(s) == hash("item-3"), hash(t) == hash((3, "item-3")), {t: 1}[(3, "item-3")]


@case([3, 1, 2])
@pydron.schedule
def iteration_builtins(xs):
    rs = [double(x) for x in xs]
    lst = make_list(3)
    return (list(zip(rs, lst)), list(enumerate(rs)), list(reversed(rs)), list(iter(lst)),
            list(map(str, rs)), list(filter(None, lst)), dict(zip(lst, rs)), next(iter(rs)))


@case(3)
@pydron.schedule
def attribute_and_method_on_result(x):
    p = make_point(x, 4)
    s = label(x)
    d = make_dict("k", x)
    return p.x, p.norm2(), s.upper(), s.split("-"), d.get("k"), sorted(d.keys()), s.__len__()


@case(4)
@pydron.schedule
def copy_and_pickle_results(x):
    r = make_list(x)
    d = make_dict("k", x)
    cp = copy.copy(r)
    dp = copy.deepcopy({"r": r, "d": d})
    blob = pickle.dumps((r, d))
    return cp, dp, pickle.loads(blob), cp is r


@case([1, 2, 3])
@pydron.schedule
def repr_and_str_of_containers(xs):
    rs = [square(x) for x in xs]
    nested = {"k": [rs[0], (rs[1], {rs[2]})]}
    return repr(rs), str(nested), repr(make_point(1, 2)), ascii(label(1))


@case([1, 2, 3])
@pydron.schedule
def results_to_builtin_constructors(xs):
    rs = [double(x) for x in xs]
    return tuple(rs), list(rs), set(rs), frozenset(rs), dict.fromkeys(rs, 0), bytes(rs), \
        bytearray(rs), str(rs), range(rs[0], rs[2])


@case(2)
@pydron.schedule
def compare_instances(x):
    p = make_point(x, x)
    q = make_point(x, x)
    return p == q, p is q, p == Point(2, 2), p != make_point(0, 0)


@case(3)
@pydron.schedule
def identity_after_in_place_forcing(n):
    r = make_list(n)
    lst = [r, r]
    print(lst)                                   # forces the list's items in place
    big = identity(10 ** 30)
    holder = {"k": big, "t": (big,)}
    text = str(holder)                           # forces the dict (and the tuple) in place
    s = label(n)
    pairs = [(s, s)]
    joined = ",".join(pairs[0])
    return (lst[0] is r, lst[1] is lst[0], holder["k"] is big, holder["t"][0] is big,
            id(holder["k"]) == id(big), pairs[0][0] is s, text, joined)
