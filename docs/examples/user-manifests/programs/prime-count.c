// SPDX-License-Identifier: GPL-2.0-or-later
// Counts the primes below N by trial division, printing a line every
// thousand primes (so the kernel sees some writes) and the total.
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 10000, count = 0;

	for (long i = 2; i < n; i++) {
		int prime = 1;
		for (long d = 2; d * d <= i; d++) {
			if (i % d == 0) {
				prime = 0;
				break;
			}
		}
		if (prime && ++count % 1000 == 0) {
			printf("%ld primes so far\n", count);
			fflush(stdout);
		}
	}
	printf("primes: %ld\n", count);
	return 0;
}
