// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * thread-loop: user-space threads entering the kernel on every vCPU at once,
 * for recording and replay of multi-vCPU guests.
 *
 * Usage: thread-loop THREADS ITERATIONS
 *
 * Thread i pins itself to CPU i % ncpus and, each iteration, enters the
 * kernel through getpid, a write and a read on its own pipe, a write of a
 * buffer all threads keep changing (the kernel copies user memory that other
 * vCPUs write at the same time), sched_yield, and a mutex shared by all
 * threads (contended: futex waits and wakes across vCPUs).
 *
 * Prints "threads: N", "cpus used: K" (distinct CPUs the threads ran on, by
 * sched_getcpu), "shared counter: C" (THREADS * ITERATIONS when the mutex
 * works) and exits 0; a failing call prints what failed and exits 1 (2 for
 * usage errors).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_THREADS 16

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long long shared_counter;
static volatile char shared_buf[64];
static unsigned long iterations;
static int ncpus;
static int cpu_used[MAX_THREADS * 4];

static void die(const char *what, long thread)
{
	fprintf(stderr, "thread-loop: %s failed in thread %ld: %s\n", what,
		thread, strerror(errno));
	exit(1);
}

static void *worker(void *arg)
{
	long id = (long)arg;
	int fds[2];
	char buf[64];
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(id % ncpus, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		die("sched_setaffinity", id);
	if (pipe(fds) != 0)
		die("pipe", id);
	for (unsigned long i = 0; i < iterations; i++) {
		if (syscall(SYS_getpid) <= 0)
			die("getpid", id);
		shared_buf[i % sizeof(shared_buf)] = (char)(id + i);
		if (write(fds[1], (const char *)shared_buf, sizeof(buf)) !=
		    (ssize_t)sizeof(buf))
			die("write", id);
		if (read(fds[0], buf, sizeof(buf)) != (ssize_t)sizeof(buf))
			die("read", id);
		sched_yield();
		if (pthread_mutex_lock(&lock) != 0)
			die("pthread_mutex_lock", id);
		shared_counter++;
		int cpu = sched_getcpu();
		if (cpu >= 0 && cpu < (int)(sizeof(cpu_used) / sizeof(cpu_used[0])))
			cpu_used[cpu] = 1;
		if (pthread_mutex_unlock(&lock) != 0)
			die("pthread_mutex_unlock", id);
	}
	close(fds[0]);
	close(fds[1]);
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t threads[MAX_THREADS];
	long n;
	char *end;

	if (argc != 3) {
		fprintf(stderr, "usage: thread-loop THREADS ITERATIONS\n");
		return 2;
	}
	n = strtol(argv[1], &end, 10);
	if (*end || n < 1 || n > MAX_THREADS) {
		fprintf(stderr, "thread-loop: THREADS %s: expected 1 to %d\n",
			argv[1], MAX_THREADS);
		return 2;
	}
	iterations = strtoul(argv[2], &end, 10);
	if (*end || iterations == 0) {
		fprintf(stderr,
			"thread-loop: ITERATIONS %s: expected a positive number\n",
			argv[2]);
		return 2;
	}
	ncpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
	if (ncpus < 1)
		ncpus = 1;
	for (long i = 0; i < n; i++) {
		errno = pthread_create(&threads[i], NULL, worker, (void *)i);
		if (errno != 0)
			die("pthread_create", i);
	}
	for (long i = 0; i < n; i++) {
		errno = pthread_join(threads[i], NULL);
		if (errno != 0)
			die("pthread_join", i);
	}
	int used = 0;
	for (size_t c = 0; c < sizeof(cpu_used) / sizeof(cpu_used[0]); c++)
		used += cpu_used[c];
	printf("threads: %ld\n", n);
	printf("cpus used: %d\n", used);
	printf("shared counter: %llu\n", shared_counter);
	return shared_counter == (unsigned long long)n * iterations ? 0 : 1;
}
