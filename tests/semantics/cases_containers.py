"""Results moved around: stored into lists, dicts, tuples and nested containers and read back,
list.append/extend/insert, dict stores, len(), tuple and star unpacking, results as dict keys and
set members, attribute and global stores, class instances returned by tasks, aliasing."""

import types

import pydron

from .registry import case
from .tasks import (Box, Point, add, double, identity, label, make_box, make_dict, make_list,
                    make_point, pair, qr, split_words, square, total)


@case(3)
@pydron.schedule
def nested_containers(x):
    d = {"a": double(x), "b": [square(x), (add(x, 1), {"deep": label(x)})]}
    t = (d["a"], d["b"][1][1]["deep"])
    return d, t


@case([1, 2, 3])
@pydron.schedule
def append_extend_insert(xs):
    out = []
    for x in xs:
        out.append(square(x))
    out.extend([double(x) for x in xs])
    out.extend(make_list(2))
    out.insert(0, label(0))
    out.insert(2, identity("mid"))
    out += [add(1, 1)]
    return out


@case([5, 6, 7])
@pydron.schedule
def len_of_results(xs):
    rs = []
    lengths = []
    for x in xs:
        rs.append(double(x))
        lengths.append(len(rs))
    return len(rs), lengths, len(make_list(4)), len({"k": rs[0]})


@case([1, 2, 3])
@pydron.schedule
def dict_stores_and_reads(xs):
    d = {}
    for x in xs:
        d[label(x)] = square(x)
        d[x] = double(x)
    d.update(extra=identity(0))
    d.setdefault("absent", total(list(d.values())[:2]))
    return d, d[1], d.get("item-2"), list(d)


@case(17, 5)
@pydron.schedule
def tuple_unpacking(a, b):
    q, r = qr(a, b)
    (x, y), z = pair(q, r), double(r)
    return q, r, x, y, z


@case("alpha beta gamma delta")
@pydron.schedule
def star_unpacking(text):
    first, *middle, last = split_words(text)
    head, *tail = make_list(4)
    return first, middle, last, head, tail


@case([3, 1, 3, 2, 1])
@pydron.schedule
def results_as_set_members(xs):
    rs = [square(x) for x in xs]
    s = set(rs)
    s.add(double(5))
    return sorted(s), square(3) in s, 1000 in s, len(s), frozenset(rs[:2])


@case([1, 2, 1, 3])
@pydron.schedule
def results_as_dict_keys(xs):
    counts = {}
    for x in xs:
        k = label(x)
        counts[k] = counts.get(k, 0) + 1
    return counts, (label(1) in counts)


@case(4)
@pydron.schedule
def attribute_stores(x):
    ns = types.SimpleNamespace()
    ns.value = square(x)
    ns.items = [double(x), add(x, 1)]
    box = Box("b", [])
    box.items.append(identity(x))
    box.label = label(x)
    return ns, box


GLOBAL_RESULT = None
GLOBAL_LIST = []


@case(6)
@pydron.schedule
def global_stores(x):
    global GLOBAL_RESULT
    GLOBAL_LIST.clear()
    GLOBAL_RESULT = square(x)
    GLOBAL_LIST.append(double(x))
    return GLOBAL_RESULT + 1, list(GLOBAL_LIST)


@case([(1, 2), (3, 4)])
@pydron.schedule
def class_instances_from_tasks(coords):
    points = [make_point(x, y) for x, y in coords]
    norms = [p.norm2() for p in points]
    box = make_box("pts", [p.x for p in points])
    return points, norms, box, points[0] == Point(1, 2)


@case([1, 2])
@pydron.schedule
def dataclass_fields_to_tasks(xs):
    p = make_point(double(xs[0]), square(xs[1]))
    return add(p.x, p.y), p


@case(5)
@pydron.schedule
def aliasing_preserved(x):
    r = make_list(x)
    holder = [r, r]
    d = {"first": r, "again": holder}
    same = holder[0] is holder[1]
    holder[0].append(99)
    return d, same, len(r), d["again"][1][-1]


@case(3)
@pydron.schedule
def results_through_tuples(x):
    t = (square(x), double(x))
    u = t + (add(x, x),)
    nested = (t, [u])
    a, b = t
    return nested, a + b, u[2], t[::-1]


@case([4, 2, 8])
@pydron.schedule
def results_into_task_containers(xs):
    d = {"values": [square(x) for x in xs]}
    s = total(d["values"])
    t = total((double(xs[0]), double(xs[1])))
    m = make_dict("k", s)
    return s, t, m, total([m["n"], t])


@case(3)
@pydron.schedule
def list_slices_and_index(n):
    rs = [square(i) for i in range(n * 3)]
    return rs[1:4], rs[::2], rs[-1], rs[n], rs.index(square(2)), rs.count(0)


@case(4)
@pydron.schedule
def list_mutation_methods(n):
    rs = [double(i) for i in range(n)]
    rs.reverse()
    popped = rs.pop()
    rs.sort()
    rs.remove(double(2))
    cp = rs.copy()
    del rs[0]
    return rs, popped, cp


@case(3)
@pydron.schedule
def dict_of_results_views(n):
    d = {label(i): square(i) for i in range(n)}
    return list(d.keys()), list(d.values()), sorted(d.items()), {**d, "z": identity(1)}


@case([1, 2, 3])
@pydron.schedule
def argument_mutated_after_call(xs):
    # A task sees its arguments as they were at the call, whatever happens to them afterwards.
    ready = list(xs)
    s1 = total(ready)                        # arguments all known: may be sent at once
    ready.append(100)
    waiting = [double(x) for x in xs]
    s2 = total(waiting)                      # waits for its dependencies before it can be sent
    waiting.append(1000)
    waiting[0] = -50
    d = {"a": square(2)}
    m = make_dict("k", d["a"])
    d["a"] = 0
    return s1, s2, ready, waiting, m


@case([1, 2, 3])
@pydron.schedule
def own_result_appended_to_argument(xs):
    out = [square(x) for x in xs]
    out.append(total(out))                   # the list the task reads now holds its own result
    out.append(total(out))
    return out
