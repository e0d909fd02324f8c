// SPDX-License-Identifier: GPL-2.0-or-later
// Forces a kernel panic through /proc/sysrq-trigger.
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>

int main(void)
{
	int fd = open("/proc/sysrq-trigger", O_WRONLY);

	if (fd < 0) {
		printf("sysrq-crash: /proc/sysrq-trigger: %s\n", strerror(errno));
		return 2;
	}
	printf("sysrq-crash: writing c\n");
	fflush(stdout);
	if (write(fd, "c", 1) != 1)
		printf("sysrq-crash: write: %s\n", strerror(errno));
	return 1;
}
