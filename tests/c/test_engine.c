/* tests/c/test_engine.c — the dependency engine: readiness counts, the order in which a finish
 * releases dependents, failure propagation (transitive, depth first, with its cause), handles
 * that outlive their node, slot reuse, long chains, and the keys of graph/keys.c's XXH3. */
#include "graph/engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #c); exit(1); } } while (0)

static engine_handle
add(engine *e, void *owner)
{
    engine_handle h;
    CHECK(engine_add(e, owner, &h) == 0);
    CHECK(h != 0 && h < (1ull << 62));
    return h;
}

static void
test_counts_and_release_order(void)
{
    engine *e = engine_new();
    engine_events ev = {0};
    engine_handle a = add(e, "a"), b = add(e, "b");
    CHECK(engine_seal(e, a) == 1 && engine_seal(e, b) == 1);
    engine_set_running(e, a);
    engine_set_running(e, b);
    CHECK(engine_state(e, a) == ENGINE_RUNNING);

    /* c waits for a and b; d for a only; f for b only; g for nothing. */
    engine_handle c = add(e, "c"), d = add(e, "d"), f = add(e, "f"), g = add(e, "g");
    CHECK(engine_depend(e, c, a) == 1 && engine_depend(e, c, b) == 1);
    CHECK(engine_depend(e, d, a) == 1);
    CHECK(engine_depend(e, f, b) == 1);
    CHECK(engine_waiting(e, c) == 2 && engine_waiting(e, d) == 1);
    CHECK(engine_seal(e, c) == 0 && engine_seal(e, d) == 0 && engine_seal(e, f) == 0);
    CHECK(engine_seal(e, g) == 1);

    /* b finishes first: f becomes ready, c still waits for a. */
    CHECK(engine_finish(e, b, 0, &ev) == 0);
    CHECK(ev.nready == 1 && ev.ready[0] == f && ev.nfailed == 0);
    CHECK(engine_waiting(e, c) == 1 && engine_state(e, c) == ENGINE_WAITING);
    engine_events_clear(&ev);

    /* a finishes: c then d, in the order they started waiting on a. */
    CHECK(engine_finish(e, a, 0, &ev) == 0);
    CHECK(ev.nready == 2 && ev.ready[0] == c && ev.ready[1] == d);
    CHECK(engine_state(e, c) == ENGINE_READY && engine_state(e, d) == ENGINE_READY);
    engine_events_clear(&ev);

    /* Finishing twice does nothing; depending on a finished node needs no wait. */
    CHECK(engine_finish(e, a, 1, &ev) == 0 && ev.nready == 0 && ev.nfailed == 0);
    CHECK(engine_state(e, a) == ENGINE_DONE);
    engine_handle h = add(e, "h");
    CHECK(engine_depend(e, h, a) == 0 && engine_seal(e, h) == 1);
    engine_events_free(&ev);
    engine_free(e);
}

static void
test_failure_propagation(void)
{
    engine *e = engine_new();
    engine_events ev = {0};
    /*   root -> x -> x1 -> x11
     *        -> y          (y also waits for other, which is fine)
     *        -> x1 is also a dependent of y? no: z waits for x and y. */
    engine_handle root = add(e, "root"), other = add(e, "other");
    engine_seal(e, root);
    engine_seal(e, other);
    engine_handle x = add(e, "x"), y = add(e, "y"), x1 = add(e, "x1"), x11 = add(e, "x11");
    engine_handle z = add(e, "z");
    CHECK(engine_depend(e, x, root) == 1);
    CHECK(engine_depend(e, y, root) == 1 && engine_depend(e, y, other) == 1);
    CHECK(engine_depend(e, x1, x) == 1);
    CHECK(engine_depend(e, x11, x1) == 1);
    CHECK(engine_depend(e, z, x) == 1 && engine_depend(e, z, y) == 1);
    for (engine_handle *p = (engine_handle[]){x, y, x1, x11, z}, *end = p + 5; p < end; p++)
        CHECK(engine_seal(e, *p) == 0);

    CHECK(engine_finish(e, root, 1, &ev) == 0);
    CHECK(ev.nready == 0);
    /* Depth first, pre-order, first dependent first: x, x1, x11, z, then y. */
    CHECK(ev.nfailed == 5);
    engine_handle want[5] = {x, x1, x11, z, y};
    for (int i = 0; i < 5; i++) {
        CHECK(ev.failed[i] == want[i]);
        CHECK(ev.cause[i] == root);
        CHECK(engine_state(e, want[i]) == ENGINE_FAILED);
    }
    engine_events_clear(&ev);

    /* other finishing now releases nothing (y already failed). */
    CHECK(engine_finish(e, other, 0, &ev) == 0 && ev.nready == 0 && ev.nfailed == 0);
    /* A new node depending on a failed one is told to fail. */
    engine_handle late = add(e, "late");
    CHECK(engine_depend(e, late, x) == 2);
    engine_events_free(&ev);
    engine_free(e);
}

static void
test_stale_handles_and_reuse(void)
{
    engine *e = engine_new();
    engine_events ev = {0};
    engine_handle a = add(e, "a");
    engine_seal(e, a);
    engine_handle w = add(e, "w");
    CHECK(engine_depend(e, w, a) == 1);
    engine_seal(e, w);
    CHECK(engine_live(e) == 2);
    /* w's owner goes away (cancelled): its slot is reused by n, which must not be released by
     * a's finish through w's stale handle. */
    engine_remove(e, w);
    CHECK(engine_live(e) == 1);
    CHECK(engine_owner(e, w) == NULL && engine_state(e, w) == -1);
    engine_handle n = add(e, "n");
    CHECK((uint32_t)n == (uint32_t)w && n != w);      /* same slot, another generation */
    CHECK(engine_seal(e, n) == 1);
    engine_set_running(e, n);
    CHECK(engine_finish(e, a, 0, &ev) == 0 && ev.nready == 0);
    CHECK(engine_state(e, n) == ENGINE_RUNNING);
    CHECK(strcmp(engine_owner(e, n), "n") == 0);
    engine_handle list[4];
    CHECK(engine_unfinished(e, list, 4) == 1 && list[0] == n);
    CHECK(engine_depend(e, n, w) == -1);               /* stale: refused */
    engine_events_free(&ev);
    engine_free(e);
}

static void
test_many_dependents_and_long_chain(void)
{
    engine *e = engine_new();
    engine_events ev = {0};
    engine_handle src = add(e, NULL);
    engine_seal(e, src);
    enum { N = 5000 };
    engine_handle *deps = malloc(N * sizeof(engine_handle));
    for (int i = 0; i < N; i++) {
        deps[i] = add(e, NULL);
        CHECK(engine_depend(e, deps[i], src) == 1);
        CHECK(engine_seal(e, deps[i]) == 0);
    }
    CHECK(engine_finish(e, src, 0, &ev) == 0);
    CHECK(ev.nready == N);
    for (int i = 0; i < N; i++)
        CHECK(ev.ready[i] == deps[i]);
    engine_events_clear(&ev);

    /* A chain of a million: failing its head fails every link, without recursion. */
    enum { CHAIN = 1000000 };
    engine_handle head = add(e, NULL), prev = head;
    engine_seal(e, head);
    for (int i = 0; i < CHAIN; i++) {
        engine_handle h = add(e, NULL);
        CHECK(engine_depend(e, h, prev) == 1);
        engine_seal(e, h);
        prev = h;
    }
    CHECK(engine_finish(e, head, 1, &ev) == 0);
    CHECK(ev.nfailed == CHAIN && ev.failed[CHAIN - 1] == prev && ev.cause[CHAIN - 1] == head);
    CHECK(engine_bytes(e) > 0);
    free(deps);
    engine_events_free(&ev);
    engine_free(e);
}

static void
test_keys(void)
{
    /* XXH3 64-bit reference values: the empty input with seed 0, and seeds change the key. */
    CHECK(XXH3_64bits_withSeed("", 0, 0) == 0x2D06800538D394C2ULL);
    CHECK(XXH3_64bits_withSeed("abc", 3, 0) != XXH3_64bits_withSeed("abc", 3, 1));
    CHECK(XXH3_64bits_withSeed("abc", 3, 7) == XXH3_64bits_withSeed("abc", 3, 7));
}

int
main(void)
{
    test_counts_and_release_order();
    test_failure_propagation();
    test_stale_handles_and_reuse();
    test_many_dependents_and_long_chain();
    test_keys();
    printf("test_engine: ok\n");
    return 0;
}
