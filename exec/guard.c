/* exec/guard.c — write protection and copy on write for arena blocks (see guard.h). Pure C (no
 * Python): the per-block state is a table indexed by the block's page, the copy on write is a
 * private anonymous mapping moved over the block's addresses with mremap, and the shared mapping
 * comes back from the arena's memfd. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "exec/guard.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* A fault at the same address this many times in a row, with nothing to copy, is not ours. */
#define MAX_RETRIES 64

typedef struct {
    uint32_t lend;             /* tasks reading the block */
    uint32_t views;            /* arrays and buffers of this process over it */
    uint8_t protected_;        /* mprotect'ed read-only here */
    uint8_t private_;          /* this process holds a private copy at its addresses */
} block_state;

static struct {
    arena *arena;
    char *base;
    size_t size;
    int memfd;
    enum guard_policy policy;
    block_state *state;        /* size / ARENA_PAGE entries */
    atomic_flag lock;
    struct sigaction previous;
    guard_stats stats;
} G = {.lock = ATOMIC_FLAG_INIT};

static _Thread_local uintptr_t last_fault;
static _Thread_local int fault_repeats;

static void
lock(void)
{
    while (atomic_flag_test_and_set_explicit(&G.lock, memory_order_acquire))
        __builtin_ia32_pause();
}

static void
unlock(void)
{
    atomic_flag_clear_explicit(&G.lock, memory_order_release);
}

static block_state *
state_of(uint64_t blk)
{
    return &G.state[blk / ARENA_PAGE];
}

/* The block's length, or 0 when blk is not an allocated block. */
static size_t
block_len(uint64_t blk)
{
    size_t len;
    return arena_block_len(G.arena, blk, &len) == 0 ? len : 0;
}

/* Protected exactly while lent, viewed here, and not already a private copy. Lock held. */
static void
update_protection(uint64_t blk, block_state *st)
{
    int want = st->lend > 0 && st->views > 0 && !st->private_;
    if (want == st->protected_)
        return;
    size_t len = block_len(blk);
    if (len == 0)
        return;
    if (mprotect(G.base + blk, len, want ? PROT_READ : PROT_READ | PROT_WRITE) == 0) {
        st->protected_ = (uint8_t)want;
        G.stats.protects += want;
    }
}

/* The block's addresses show the shared pages again (a private copy is dropped). Lock held. */
static int
map_shared(uint64_t blk, size_t len)
{
    void *p = mmap(G.base + blk, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, G.memfd,
                   (off_t)blk);
    return p == MAP_FAILED ? -1 : 0;
}

/* Copy on write: the block's addresses get a private copy of its bytes. Lock held. */
static void
copy_on_write(uint64_t blk, block_state *st)
{
    size_t len = block_len(blk);
    char *at = G.base + blk;
    void *copy = len ? mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                     : MAP_FAILED;
    if (copy != MAP_FAILED) {
        memcpy(copy, at, len);
        if (mremap(copy, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, at) != MAP_FAILED) {
            st->private_ = 1;
            st->protected_ = 0;
            G.stats.copies++;
            return;
        }
        munmap(copy, len);
    }
    /* No memory for a copy: let the write through rather than crash (the task may then see it). */
    if (len && mprotect(at, len, PROT_READ | PROT_WRITE) == 0)
        st->protected_ = 0;
}

/* The lending ended: the master's private copy becomes the shared block's content. Lock held. */
static void
merge_back(uint64_t blk, block_state *st)
{
    size_t len = block_len(blk);
    if (len == 0)
        return;
    char *at = G.base + blk;
    void *shared = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, G.memfd, (off_t)blk);
    if (shared == MAP_FAILED)
        return;                /* stays private: correct, only not shared */
    /* Writers of the private copy fault now, and wait for the lock: none is lost. */
    mprotect(at, len, PROT_READ);
    memcpy(shared, at, len);
    munmap(shared, len);
    if (map_shared(blk, len) == 0) {
        st->private_ = 0;
        G.stats.merges++;
    }
    else {
        mprotect(at, len, PROT_READ | PROT_WRITE);
    }
}

static void
discard_private(uint64_t blk, block_state *st)
{
    size_t len = block_len(blk);
    if (len && map_shared(blk, len) == 0) {
        st->private_ = 0;
        G.stats.discards++;
    }
}

/* ---- the fault handler ------------------------------------------------------------------------ */

static void
chain(int sig, siginfo_t *si, void *uc)
{
    if ((G.previous.sa_flags & SA_SIGINFO) && G.previous.sa_sigaction != NULL) {
        G.previous.sa_sigaction(sig, si, uc);
        return;
    }
    if (G.previous.sa_handler != SIG_DFL && G.previous.sa_handler != SIG_IGN &&
        G.previous.sa_handler != NULL) {
        G.previous.sa_handler(sig);
        return;
    }
    /* Nobody else wants it: the default action, when the instruction faults again. */
    signal(sig, SIG_DFL);
}

static void
on_fault(int sig, siginfo_t *si, void *uc)
{
    char *addr = si->si_addr;
    int saved_errno = errno;
    if (G.state != NULL && si->si_code == SEGV_ACCERR && addr >= G.base &&
        addr < G.base + G.size) {
        uint64_t blk;
        size_t len;
        if (arena_block_of(G.arena, addr, &blk, &len) == 0) {
            lock();
            block_state *st = state_of(blk);
            int copied = st->protected_ && !st->private_;
            if (copied)
                copy_on_write(blk, st);
            unlock();
            /* Retry the write: now private, or its protection changed meanwhile. */
            if (copied || (uintptr_t)addr != last_fault || ++fault_repeats < MAX_RETRIES) {
                if ((uintptr_t)addr != last_fault)
                    fault_repeats = 0;
                last_fault = (uintptr_t)addr;
                errno = saved_errno;
                return;
            }
        }
    }
    errno = saved_errno;
    chain(sig, si, uc);
}

int
guard_start(arena *a, int memfd, size_t arena_size, enum guard_policy policy)
{
    size_t n = arena_size / ARENA_PAGE;
    block_state *state = mmap(NULL, n * sizeof(block_state), PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (state == MAP_FAILED)
        return -1;
    lock();
    if (G.state != NULL)
        munmap(G.state, (G.size / ARENA_PAGE) * sizeof(block_state));
    G.arena = a;
    G.base = (char *)a;
    G.size = arena_size;
    G.memfd = memfd;
    G.policy = policy;
    G.state = state;
    unlock();
    /* Installed unless it is already ours (a worker resets the handlers it inherited). */
    struct sigaction current;
    if (sigaction(SIGSEGV, NULL, &current) < 0)
        return -1;
    if (!((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_fault)) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGSEGV, &sa, &G.previous) < 0)
            return -1;
    }
    return 0;
}

void
guard_stop(int forget)
{
    lock();
    size_t n = G.size / ARENA_PAGE;
    for (size_t i = 0; G.state && i < n; i++) {
        block_state *st = &G.state[i];
        uint64_t blk = (uint64_t)i * ARENA_PAGE;
        if (st->private_) {
            if (G.policy == GUARD_MERGE && st->views)
                merge_back(blk, st);
            else
                discard_private(blk, st);
        }
        st->lend = 0;
        update_protection(blk, st);
    }
    if (forget && G.state) {
        munmap(G.state, n * sizeof(block_state));
        G.state = NULL;
    }
    unlock();
}

void
guard_lend(uint64_t blk)
{
    if (G.state == NULL)
        return;
    lock();
    block_state *st = state_of(blk);
    st->lend++;
    update_protection(blk, st);
    unlock();
}

void
guard_unlend(uint64_t blk)
{
    if (G.state == NULL)
        return;
    lock();
    block_state *st = state_of(blk);
    if (st->lend > 0 && --st->lend == 0 && st->private_ && st->views > 0 &&
        G.policy == GUARD_MERGE)
        merge_back(blk, st);
    update_protection(blk, st);
    unlock();
}

void
guard_view(uint64_t blk)
{
    if (G.state == NULL)
        return;
    lock();
    block_state *st = state_of(blk);
    st->views++;
    update_protection(blk, st);
    unlock();
}

void
guard_unview(uint64_t blk)
{
    if (G.state == NULL)
        return;
    lock();
    block_state *st = state_of(blk);
    if (st->views > 0 && --st->views == 0 && st->private_)
        discard_private(blk, st);      /* nobody here looks at the copy any more */
    update_protection(blk, st);
    unlock();
}

int
guard_is_private(const void *p)
{
    uint64_t blk;
    size_t len;
    if (G.state == NULL || arena_block_of(G.arena, p, &blk, &len) < 0)
        return 0;
    lock();
    int private_ = state_of(blk)->private_;
    unlock();
    return private_;
}

void
guard_detach_after_fork(void)
{
    if (G.state == NULL)
        return;
    lock();
    size_t n = G.size / ARENA_PAGE;
    for (size_t i = 0; i < n; i++) {
        block_state *st = &G.state[i];
        uint64_t blk = (uint64_t)i * ARENA_PAGE;
        /* The child's own arrays keep their bytes, privately; the parent may reuse the block. */
        if (st->views && !st->private_)
            copy_on_write(blk, st);
        st->lend = 0;
        if (st->protected_ && mprotect(G.base + blk, block_len(blk), PROT_READ | PROT_WRITE) == 0)
            st->protected_ = 0;
    }
    G.state = NULL;            /* from now on the child leaves the arena alone */
    unlock();
}

void
guard_get_stats(guard_stats *s)
{
    lock();
    *s = G.stats;
    unlock();
}
