"""Ways a pending result could reach code that is not allowed to see it: through iterators and
views handed to C consumers (sum(iter(rs)), sorted(d.values()), ",".join(map(str, rs))), through
containers that are not exact lists/dicts (subclasses, deque, defaultdict, OrderedDict), and
through exact containers reachable from objects and modules (obj.__dict__[k] = r,
globals()[k] = r, a dict held by an object and filled afterwards)."""

import collections
import itertools
import statistics
import types

import pydron

from .registry import case
from .tasks import Box, double, identity, label, make_list, square


@case([3, 1, 2])
@pydron.schedule
def iterators_to_c_consumers(xs):
    rs = [square(x) for x in xs]
    labels = [label(x) for x in xs]
    return (sum(iter(rs)), max(reversed(rs)), min(enumerate(rs)), ",".join(map(str, rs)),
            "-".join(reversed(labels)), sum(itertools.chain(rs, rs)), statistics.mean(iter(rs)),
            sorted(filter(None, rs)), dict(zip(labels, rs)), list(itertools.islice(rs, 2)))


@case([3, 1, 2])
@pydron.schedule
def dict_views_to_c_consumers(xs):
    d = {label(x): square(x) for x in xs}
    names = {x: label(x) for x in xs}
    return (sorted(d.values()), str(d.values()), repr(d.items()), max(d.values()),
            sum(d.values()), ", ".join(names.values()), sorted(d.items()), len(d.values()),
            list(d.values()) == [9, 1, 4])


@case([1, 2, 3])
@pydron.schedule
def non_exact_containers(xs):
    class Tagged(list):
        pass

    class Table(dict):
        pass

    tl = Tagged()
    for x in xs:
        tl.append(square(x))
    tb = Table()
    tb["k"] = double(xs[0])
    dq = collections.deque()
    dq.append(square(2))
    dq.appendleft(identity("left"))
    dd = collections.defaultdict(list)
    dd["a"].append(double(5))
    od = collections.OrderedDict()
    od["z"] = label(1)
    return ([type(v).__name__ for v in tl], list(tl), type(tb["k"]).__name__, dict(tb), list(dq),
            dict(dd), list(od.items()), sum(tl), tb["k"] + 1)


GLOBAL_VIA_DICT = None


def read_global_plainly():
    return GLOBAL_VIA_DICT + 1, type(GLOBAL_VIA_DICT).__name__


@case(3)
@pydron.schedule
def stores_into_object_and_module_dicts(x):
    box = Box("b", [])
    box.__dict__["extra"] = square(x)
    vars(box)["more"] = double(x)
    globals()["GLOBAL_VIA_DICT"] = square(x + 1)
    seen_by_plain_code = read_global_plainly()
    ns = types.SimpleNamespace(table={})
    ns.table["late"] = identity(x)
    return box, seen_by_plain_code, ns, box.extra + 1


@case(4)
@pydron.schedule
def container_filled_after_it_was_shared(x):
    shared = []
    holder = Box("holder", shared)
    shared.append(make_list(x))
    shared.append(square(x))
    inner = {}
    outer = [inner]
    inner["v"] = double(x)
    return holder, outer, holder.items[1] + 0


@case([2, 3])
@pydron.schedule
def pending_inside_exception_and_class(xs):
    r = square(xs[0])
    try:
        raise ValueError(r, [double(xs[1])])
    except ValueError as e:
        args = e.args

    class Made:
        value = square(xs[1])

    return args, Made.value, type(Made.value).__name__
