/* Does this machine give one process two cores right now?
 * One thread runs six dependent integer chains; then two threads each run the
 * same work at once. "scaling" near 2 means two real cores; near 1 means the
 * VM is time-slicing one. Run before and after a multi-task benchmark. */
#include <pthread.h>
#include <stdio.h>
#include <time.h>
static volatile unsigned long sink[64];
static void *work(void *p) {
    long i = (long)p;
    unsigned long a = 1, b = 2, c = 3, d = 4, e = 5, f = 6;
    for (long k = 0; k < 1500000000L; k++) {
        a += k; b ^= k; c += a; d ^= b; e += c; f ^= d;
        __asm__ volatile("" : "+r"(a), "+r"(b), "+r"(c), "+r"(d), "+r"(e), "+r"(f));
    }
    sink[i * 8] = a + b + c + d + e + f;
    return 0;
}
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(void) {
    double t0 = now();
    work(0);
    double t1 = now();
    pthread_t x, y;
    pthread_create(&x, 0, work, (void *)1);
    pthread_create(&y, 0, work, (void *)2);
    pthread_join(x, 0);
    pthread_join(y, 0);
    double t2 = now();
    printf("1 thread %.2fs, 2 threads (2x work) %.2fs, scaling %.2f\n",
           t1 - t0, t2 - t1, 2 * (t1 - t0) / (t2 - t1));
    return 0;
}
