/* pydron_clock.h — the one clock of pydron's C code: CLOCK_MONOTONIC, the clock the timeline,
 * the progress reports, task run times and every timeout are measured on. */
#ifndef PYDRON_CLOCK_H
#define PYDRON_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t
pydron_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Seconds, as the Python side sees them (pydron._core._clock()). */
static inline double
pydron_now(void)
{
    return (double)pydron_now_ns() * 1e-9;
}

#endif
