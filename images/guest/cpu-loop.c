// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * cpu-loop: a CPU-bound guest workload (the counterpart of syscall-loop for
 * recording benchmarks): user-space arithmetic and memory traffic in a 1 MiB
 * buffer, no system calls until the end, so the kernel only sees timer
 * interrupts and the page faults of the buffer's first touch.
 *
 * Usage: cpu-loop MILLIONS
 *
 * Runs MILLIONS million rounds of a xorshift generator that reads and
 * writes the buffer, then prints "rounds: N" and "checksum: X" and exits 0
 * (2 for usage errors). The checksum depends only on MILLIONS, so a
 * replayed or re-run guest prints the same one.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define BUFFER_WORDS (1u << 17) /* 1 MiB of uint64_t */

static uint64_t buffer[BUFFER_WORDS];

int main(int argc, char **argv)
{
	char *end;
	unsigned long long millions, rounds, i;
	uint64_t x = 0x9e3779b97f4a7c15ull, sum = 0;

	if (argc != 2) {
		fprintf(stderr, "usage: cpu-loop MILLIONS\n");
		return 2;
	}
	millions = strtoull(argv[1], &end, 10);
	if (*argv[1] == '\0' || *end != '\0' || millions == 0 || millions > 1000000) {
		fprintf(stderr, "cpu-loop: MILLIONS must be 1..1000000, got %s\n", argv[1]);
		return 2;
	}
	rounds = millions * 1000000ull;
	for (i = 0; i < rounds; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		buffer[x & (BUFFER_WORDS - 1)] += x;
		sum += buffer[(x >> 20) & (BUFFER_WORDS - 1)];
	}
	printf("rounds: %llu\nchecksum: %016llx\n", rounds, (unsigned long long)sum);
	return 0;
}
