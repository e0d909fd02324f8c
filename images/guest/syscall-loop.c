// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * syscall-loop: a syscall-heavy guest workload for recording and replay.
 *
 * Usage: syscall-loop ITERATIONS
 *
 * Each iteration enters the kernel through getpid, pipe2, write, read,
 * open, fstat, stat, close, gettimeofday and clock_gettime (12 syscalls).
 * The time calls go through syscall(2) on purpose: glibc would serve them
 * from the vDSO without entering the kernel, and this program exists to
 * exercise the kernel's entry path.
 *
 * Prints "iterations: N", "syscalls: M", "seconds: S" and "ops/s: <float>"
 * (syscalls per second) and exits 0; any failing syscall or bad argument
 * prints what failed to stderr and exits 1 (2 for usage errors).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define SYSCALLS_PER_ITERATION 12

static void die(const char *what, unsigned long long iteration)
{
	fprintf(stderr, "syscall-loop: %s failed at iteration %llu: %s\n",
		what, iteration, strerror(errno));
	exit(1);
}

static double monotonic_seconds(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		die("clock_gettime(CLOCK_MONOTONIC)", 0);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	/* /proc/self/stat always exists once /init has mounted proc; fall back
	 * to / (always present) so the loop also runs in a bare chroot. */
	const char *open_path = access("/proc/self/stat", R_OK) == 0 ?
		"/proc/self/stat" : "/";
	unsigned long long iterations, i;
	char *end;
	double start, elapsed;

	if (argc != 2) {
		fprintf(stderr, "usage: %s ITERATIONS\n", argv[0]);
		return 2;
	}
	errno = 0;
	iterations = strtoull(argv[1], &end, 10);
	if (errno != 0 || end == argv[1] || *end != '\0' || argv[1][0] == '-' ||
	    iterations == 0) {
		fprintf(stderr,
			"syscall-loop: ITERATIONS must be a positive integer, got '%s'\n",
			argv[1]);
		return 2;
	}

	start = monotonic_seconds();
	for (i = 0; i < iterations; i++) {
		int fds[2], fd;
		char byte = (char)i;
		struct stat st;
		struct timeval tv;
		struct timespec ts;

		if (syscall(SYS_getpid) <= 0)
			die("getpid", i);
		if (pipe2(fds, O_CLOEXEC) != 0)
			die("pipe2", i);
		if (write(fds[1], &byte, 1) != 1)
			die("write", i);
		if (read(fds[0], &byte, 1) != 1)
			die("read", i);
		if (close(fds[0]) != 0 || close(fds[1]) != 0)
			die("close(pipe)", i);
		fd = open(open_path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			die("open", i);
		if (fstat(fd, &st) != 0)
			die("fstat", i);
		if (close(fd) != 0)
			die("close", i);
		if (stat(open_path, &st) != 0)
			die("stat", i);
		if (syscall(SYS_gettimeofday, &tv, NULL) != 0)
			die("gettimeofday", i);
		if (syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &ts) != 0)
			die("clock_gettime", i);
	}
	elapsed = monotonic_seconds() - start;
	if (elapsed <= 0)
		elapsed = 1e-9;

	printf("iterations: %llu\n", iterations);
	printf("syscalls: %llu\n", iterations * SYSCALLS_PER_ITERATION);
	printf("seconds: %.6f\n", elapsed);
	printf("ops/s: %.1f\n",
	       (double)(iterations * SYSCALLS_PER_ITERATION) / elapsed);
	return 0;
}
