"""Python constructs through the rewrite, a case each: comprehensions, conditionals and loops,
closures, lambdas, defaults and star-arguments, unpacking, nested and recursive scheduled calls,
inner generators and `yield from`, match statements, f-strings and %-formatting, identity and
type checks, C consumers (str.join, json, struct, numpy), super() in scheduled and plain
methods, frame introspection (locals, vars, dir, sys._getframe), print, subscript, slice,
attribute and global stores, every operator, augmented assignment, walrus, classes and
coroutines defined inside, del, list and dict methods, a code object with 300 call sites."""

import json
import math
import struct
import sys

import numpy as np

import pydron

from .registry import case
from .tasks import (Point, add, gather, label, make_list, make_point, maybe_none, square,
                    succ_pair, triple, xy_dict)


@case(range(0, 6))
@pydron.schedule
def loop_append(xs):
    r = []
    for x in xs:
        r.append(square(x))
    return sum(r), r


@case([1, 2, 3])
@pydron.schedule
def listcomp(xs):
    return [square(x) for x in xs]


@case(range(0, 5))
@pydron.schedule
def dictcomp(xs):
    return {x: square(x) for x in xs}


@case(range(0, 7))
@pydron.schedule
def setcomp(xs):
    return {square(x) % 3 for x in xs}


@case(range(0, 5))
@pydron.schedule
def genexpr(xs):
    return sum(square(x) for x in xs), max(square(x) for x in xs)


@case(4)
@pydron.schedule
def nested_comp(n):
    return [[add(i, j) for j in range(i)] for i in range(n)]


@case(range(0, 6))
@pydron.schedule
def comp_filter(xs):
    return [v for v in [square(x) for x in xs] if v % 2 == 0]


@case(3, name="cond(3)")
@case(2, name="cond(2)")
@case(1, name="cond(1)")
@pydron.schedule
def cond(x):
    a = square(x)
    if a > 5:
        return "big", a
    elif a == 4:
        return "four", a
    return "small", a


@case(50)
@pydron.schedule
def while_loop(n):
    i = 0
    v = square(1)
    while v < n:
        v = add(v, square(i))
        i += 1
    return v, i


@case([1, 2, 3])
@pydron.schedule
def closure(xs):
    total = 0
    base = square(2)

    def inner(v):
        nonlocal total
        total += v + base
        return total

    for x in xs:
        inner(square(x))
    return total, inner(0)


@case([3, 1, 2])
@pydron.schedule
def lambdas(xs):
    f = lambda v: square(v) + 1  # noqa: E731
    return [f(x) for x in xs], sorted(xs, key=lambda v: -square(v))


@case(1, name="defaults(1)")
@case(1, 2, name="defaults(1, 2)")
@case(1, kwargs={'z': 9}, name="defaults(1, z=9)")
@pydron.schedule
def defaults(x, y=3, *, z=4):
    return triple(x, c=square(y)), triple(b=square(z), a=x), triple(*[x, y], **{"c": square(z)})


@case(1, 2, 3, kwargs={'a': 1})
@pydron.schedule
def starargs(*args, **kwargs):
    return gather(*args, **kwargs), gather(*[square(a) for a in args], k=square(2))


@case(2)
@pydron.schedule
def unpack(x):
    a, b = succ_pair(square(x))
    first, *rest = make_list(5)
    (c, d), e = succ_pair(x), square(x)
    return a, b, first, rest, c, d, e


@pydron.schedule
def scheduled_squares(xs):
    return [square(x) for x in xs]


@pydron.schedule
def scheduled_fib(n):
    if n < 2:
        return square(n)
    return add(scheduled_fib(n - 1), scheduled_fib(n - 2))


@pydron.schedule
def scheduled_count(n):
    if n == 0:
        return square(0)
    return add(scheduled_count(n - 1), 1)


class Base:
    def m(self, x):
        return x + 100


class Derived(Base):
    def m(self, x):
        return super().m(square(x)) + square(x)


class Derived2(Base):
    @pydron.schedule
    def m(self, x):
        return super().m(square(x)) + square(x)


case(Derived2(), 3, name="scheduled_method_with_super")(Derived2.m)

G = None


@case([1, 2, 3])
@pydron.schedule
def nested_scheduled(xs):
    r = scheduled_squares(xs)
    return sum(r), scheduled_fib(8)


@case([1, 2, 3])
@pydron.schedule
def inner_generator(xs):
    def gen():
        for x in xs:
            yield square(x)
        return "end"

    out = list(gen())
    g = gen()
    first = next(g)
    return out, first


@case(range(0, 10))
@pydron.schedule
def early_return(xs):
    for x in xs:
        v = square(x)
        if v > 10:
            return x, v
    return None


@case(range(0, 10))
@pydron.schedule
def break_continue(xs):
    out = []
    for x in xs:
        v = square(x)
        if v == 4:
            continue
        if v > 30:
            break
        out.append(v)
    else:
        out.append("no break")
    return out


@case(2, name="match_statement(2)")
@case(0, name="match_statement(0)")
@case(1, name="match_statement(1)")
@pydron.schedule
def match_statement(x):
    out = []
    match succ_pair(square(x)):
        case (a, b) if a > 3:
            out.append(("big", a, b))
        case (0, _):
            out.append("zero")
        case _:
            out.append("other")
    match xy_dict(x):
        case {"x": 2, "y": [p, q]}:
            out.append(("two", p, q))
        case {"x": v}:
            out.append(("x", v))
    match make_point(x, -x):
        case Point(x=0):
            out.append("origin")
        case Point(x=px, y=py):
            out.append((px, py))
    match square(x):
        case 4:
            out.append("four")
        case int(n):
            out.append(n)
    return out


@case(3)
@pydron.schedule
def fstrings(x):
    a = square(x)
    return (f"{a} and {square(x + 1):>5} {label(x)!r} {a:.2f}", "%d-%s" % (square(2), label(3)),
            "{}/{}".format(square(1), a), "%(a)s" % {"a": a})


@case(range(0, 6))
@pydron.schedule
def is_none(xs):
    out = []
    for x in xs:
        r = maybe_none(x)
        if r is None:
            out.append("none")
        elif r is not None and r > 2:
            out.append(r)
    return out


@case(3)
@pydron.schedule
def type_isinstance(x):
    a = square(x)
    b = label(x)
    return type(a).__name__, isinstance(b, str), type(succ_pair(x)) is tuple, id(a) == id(a)


@case(range(0, 4))
@pydron.schedule
def join(xs):
    names = [label(x) for x in xs]
    return ",".join(names), " ".join(label(x) for x in xs)


@case([1, 2, 3])
@pydron.schedule
def json_struct_numpy(xs):
    r = [square(x) for x in xs]
    arr = np.array(r)
    return (json.dumps(r), struct.pack("%di" % len(r), *r), arr.sum(),
            np.array([square(2), 5]).tolist())


@case(3, submits_tasks=False)   # Derived.m is plain code: its calls run plainly
@pydron.schedule
def super_call(x):
    return Derived().m(x)


@case(2)
@pydron.schedule
def introspection(x):
    y = square(x)
    try:
        z = square(y)
    except ValueError:
        z = 0
    loc = sorted(locals())
    fr = sys._getframe()
    return loc, fr.f_code.co_name, sorted(vars()), dir(), z


@case([1, 2, 3])
@pydron.schedule
def print_calls(xs):
    for x in xs:
        print("value", square(x), end=";")
    print()
    r = [square(x) for x in xs]
    print(r)
    return len(r)


@case([1, 2, 3, 4])
@pydron.schedule
def store_subscr(xs):
    d = {}
    lst = [0] * len(xs)
    for i, x in enumerate(xs):
        d[label(x)] = square(x)
        lst[i] = square(x)
    lst[0] += 1
    del lst[-1]
    return d, lst, d.get("n2"), lst[1:3], lst[::-1]


@case(3)
@pydron.schedule
def global_attr(x):
    global G
    G = square(x)
    p = Point(0, 0)
    p.x = square(x)
    p.y = succ_pair(x)
    return G, p


@case(2)
@pydron.schedule
def operators(x):
    a, b = square(x), square(x + 1)
    r = [square(i) for i in range(4)]
    return (a + b, a - b, a * b, b / a, b // a, b % a, -a, ~a, +a, a ** 2, a << 1, a & b,
            a | b, a ^ b, not a, a < b, a == b, 0 < a < 10, a if b else -1, a and b, a or b,
            square(0) or square(2), a in r, b not in r, r + [a], r * 2, [*r, *r],
            {**{"a": a}, "b": b},
            (lambda: a)(), math.sqrt(a), abs(-a), divmod(b, a))


@case(range(0, 4))
@pydron.schedule
def augmented(xs):
    t = 0
    s = ""
    for x in xs:
        t += square(x)
        s += label(x)
    t -= 1
    return t, s


@case(range(0, 5))
@pydron.schedule
def walrus_assert(xs):
    assert square(2) == 4, "sq"
    out = [y for x in xs if (y := square(x)) > 3]
    if (n := len(out)) > 1:
        return n, out
    return out


@case(2)
@pydron.schedule
def class_inside(x):
    class Local:
        k = 7

        def get(self):
            return self.k

    o = Local()
    return o.get() + square(x)


@case(2)
@pydron.schedule
def del_and_rebind(x):
    a = square(x)
    b = a
    del a
    a = square(x + 1)
    return a, b


@case(range(0, 6))
@pydron.schedule
def dict_methods(xs):
    d = {}
    for x in xs:
        d.setdefault(x % 2, []).append(square(x))
    return sorted(d.items()), sum(d[0]), list(d.keys()), sorted(d.values())


@case([1, 2, 3, 4])
@pydron.schedule
def list_methods(xs):
    r = [square(x) for x in xs]
    r.insert(0, square(9))
    r.extend([square(7)])
    r.sort()
    r.reverse()
    idx = r.index(square(3))
    return r, idx, r.count(square(2)), r.pop(), min(r), sorted(r)


@case([1, 2, 3])
@pydron.schedule
def zip_enumerate(xs):
    r = [square(x) for x in xs]
    return list(zip(xs, r)), list(enumerate(r)), dict(zip(xs, r)), [a + b for a, b in zip(r, r)]


@case(2)
@pydron.schedule
def tuple_identity(x):
    t = (square(x), square(x + 1))
    u = t
    print(t)
    return t is u, id(t) == id(u), t


@case(2)
@pydron.schedule
def starred_call_pending(x):
    args = succ_pair(x)
    return add(*args), triple(*succ_pair(x)), gather(*make_list(3), **xy_dict(x))


@case(range(0, 5))
@pydron.schedule
def bool_ops(xs):
    r = [maybe_none(x) for x in xs]
    return [bool(v) for v in r], all(r), any(r), [v for v in r if v]


@case([1])
@pydron.schedule
def yield_from_inner(xs):
    def sub():
        yield square(1)
        return square(2)

    def outer():
        v = yield from sub()
        yield v

    return list(outer())


@case(2)
@pydron.schedule
def chain_calls(x):
    return add(add(square(x), square(x + 1)), add(1, 2))


@case(12)
@pydron.schedule
def string_methods(x):
    s = label(x)
    return s.upper(), s.startswith("n"), s[1:], len(s), s * 2, s.split("1")


@case(2)
@pydron.schedule
def async_inner(x):
    async def co(v):
        return v + 1

    c = co(square(x))
    try:
        c.send(None)
    except StopIteration as e:
        return e.value


@case([1, 2])
@pydron.schedule
def lambda_default(xs):
    f = lambda v, b=square(2): v + b  # noqa: E731
    return [f(x) for x in xs]


@case(2)
@pydron.schedule
def class_closure(x):
    y = square(x)

    class A:
        z = y
        w = y is None

    return A.z + 1, A.w, A.z is None


@case(2)
@pydron.schedule
def method_on_pending(x):
    p = make_point(x, -x)
    t = succ_pair(x)
    return p.x, p.y, t.count(x), t.index(x + 1), xy_dict(x)["y"], xy_dict(x).get("x")


@case([1, 2, 3])
@pydron.schedule
def print_star(xs):
    r = [square(x) for x in xs]
    print(*r, sep=",")
    print(*[label(x) for x in xs], **{"sep": "|"})
    return r


@case(2)
@pydron.schedule
def kwonly_mix(x):
    return (triple(square(x), *[square(x + 1)], c=square(2)),
            gather(*succ_pair(x), **xy_dict(x), z=square(1)))


@case(3)
@pydron.schedule
def many_calls(n):
    r = []
    r.append(add(square(n), 0))
    r.append(add(square(n), 1))
    r.append(add(square(n), 2))
    r.append(add(square(n), 3))
    r.append(add(square(n), 4))
    r.append(add(square(n), 5))
    r.append(add(square(n), 6))
    r.append(add(square(n), 7))
    r.append(add(square(n), 8))
    r.append(add(square(n), 9))
    r.append(add(square(n), 10))
    r.append(add(square(n), 11))
    r.append(add(square(n), 12))
    r.append(add(square(n), 13))
    r.append(add(square(n), 14))
    r.append(add(square(n), 15))
    r.append(add(square(n), 16))
    r.append(add(square(n), 17))
    r.append(add(square(n), 18))
    r.append(add(square(n), 19))
    r.append(add(square(n), 20))
    r.append(add(square(n), 21))
    r.append(add(square(n), 22))
    r.append(add(square(n), 23))
    r.append(add(square(n), 24))
    r.append(add(square(n), 25))
    r.append(add(square(n), 26))
    r.append(add(square(n), 27))
    r.append(add(square(n), 28))
    r.append(add(square(n), 29))
    r.append(add(square(n), 30))
    r.append(add(square(n), 31))
    r.append(add(square(n), 32))
    r.append(add(square(n), 33))
    r.append(add(square(n), 34))
    r.append(add(square(n), 35))
    r.append(add(square(n), 36))
    r.append(add(square(n), 37))
    r.append(add(square(n), 38))
    r.append(add(square(n), 39))
    r.append(add(square(n), 40))
    r.append(add(square(n), 41))
    r.append(add(square(n), 42))
    r.append(add(square(n), 43))
    r.append(add(square(n), 44))
    r.append(add(square(n), 45))
    r.append(add(square(n), 46))
    r.append(add(square(n), 47))
    r.append(add(square(n), 48))
    r.append(add(square(n), 49))
    r.append(add(square(n), 50))
    r.append(add(square(n), 51))
    r.append(add(square(n), 52))
    r.append(add(square(n), 53))
    r.append(add(square(n), 54))
    r.append(add(square(n), 55))
    r.append(add(square(n), 56))
    r.append(add(square(n), 57))
    r.append(add(square(n), 58))
    r.append(add(square(n), 59))
    r.append(add(square(n), 60))
    r.append(add(square(n), 61))
    r.append(add(square(n), 62))
    r.append(add(square(n), 63))
    r.append(add(square(n), 64))
    r.append(add(square(n), 65))
    r.append(add(square(n), 66))
    r.append(add(square(n), 67))
    r.append(add(square(n), 68))
    r.append(add(square(n), 69))
    r.append(add(square(n), 70))
    r.append(add(square(n), 71))
    r.append(add(square(n), 72))
    r.append(add(square(n), 73))
    r.append(add(square(n), 74))
    r.append(add(square(n), 75))
    r.append(add(square(n), 76))
    r.append(add(square(n), 77))
    r.append(add(square(n), 78))
    r.append(add(square(n), 79))
    r.append(add(square(n), 80))
    r.append(add(square(n), 81))
    r.append(add(square(n), 82))
    r.append(add(square(n), 83))
    r.append(add(square(n), 84))
    r.append(add(square(n), 85))
    r.append(add(square(n), 86))
    r.append(add(square(n), 87))
    r.append(add(square(n), 88))
    r.append(add(square(n), 89))
    r.append(add(square(n), 90))
    r.append(add(square(n), 91))
    r.append(add(square(n), 92))
    r.append(add(square(n), 93))
    r.append(add(square(n), 94))
    r.append(add(square(n), 95))
    r.append(add(square(n), 96))
    r.append(add(square(n), 97))
    r.append(add(square(n), 98))
    r.append(add(square(n), 99))
    r.append(add(square(n), 100))
    r.append(add(square(n), 101))
    r.append(add(square(n), 102))
    r.append(add(square(n), 103))
    r.append(add(square(n), 104))
    r.append(add(square(n), 105))
    r.append(add(square(n), 106))
    r.append(add(square(n), 107))
    r.append(add(square(n), 108))
    r.append(add(square(n), 109))
    r.append(add(square(n), 110))
    r.append(add(square(n), 111))
    r.append(add(square(n), 112))
    r.append(add(square(n), 113))
    r.append(add(square(n), 114))
    r.append(add(square(n), 115))
    r.append(add(square(n), 116))
    r.append(add(square(n), 117))
    r.append(add(square(n), 118))
    r.append(add(square(n), 119))
    r.append(add(square(n), 120))
    r.append(add(square(n), 121))
    r.append(add(square(n), 122))
    r.append(add(square(n), 123))
    r.append(add(square(n), 124))
    r.append(add(square(n), 125))
    r.append(add(square(n), 126))
    r.append(add(square(n), 127))
    r.append(add(square(n), 128))
    r.append(add(square(n), 129))
    r.append(add(square(n), 130))
    r.append(add(square(n), 131))
    r.append(add(square(n), 132))
    r.append(add(square(n), 133))
    r.append(add(square(n), 134))
    r.append(add(square(n), 135))
    r.append(add(square(n), 136))
    r.append(add(square(n), 137))
    r.append(add(square(n), 138))
    r.append(add(square(n), 139))
    r.append(add(square(n), 140))
    r.append(add(square(n), 141))
    r.append(add(square(n), 142))
    r.append(add(square(n), 143))
    r.append(add(square(n), 144))
    r.append(add(square(n), 145))
    r.append(add(square(n), 146))
    r.append(add(square(n), 147))
    r.append(add(square(n), 148))
    r.append(add(square(n), 149))
    return sum(r)


@case(150)
@pydron.schedule
def deep_recursion(n):
    return scheduled_count(n)


@case(2)
@pydron.schedule
def pending_in_nested_containers(x):
    d = {"a": [square(x), (square(x + 1), {"b": square(2)})]}
    lst = [d, d]
    s = json.dumps(lst)
    return s, lst[0] is lst[1], d["a"][1][1]["b"]


@case([1, 2, 3, 4], raises=IndexError)
@pydron.schedule
def slice_ops(xs):
    r = [square(x) for x in xs]
    a, b = square(1), square(2)
    r[a:b] = [square(9)]
    s = r[a:b + 1]
    del r[a:b]
    return r, s, r[square(1)]


@case(3)
@pydron.schedule
def arg_cell(x, y=2):
    def g():
        return x + square(y)

    x = square(x)
    return g(), (lambda: y)()
