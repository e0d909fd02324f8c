// SPDX-License-Identifier: GPL-2.0-or-later
// aio poll / eventfd recursion trigger: an aio poll request waits for an
// eventfd to become readable, and reports its completion to that same
// eventfd (IOCB_FLAG_RESFD). Writing to the eventfd wakes the request
// inside eventfd_write(); without the fix's punt to a workqueue it
// completes there and signals the eventfd being written.
#include <errno.h>
#include <linux/aio_abi.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void)
{
	aio_context_t ctx = 0;
	struct iocb cb;
	struct iocb *cbs[1] = { &cb };
	uint64_t one = 1;
	int efd = eventfd(0, 0);

	if (efd < 0 || syscall(SYS_io_setup, 8, &ctx) < 0) {
		printf("trigger: eventfd/io_setup: %s\n", strerror(errno));
		return 2;
	}
	memset(&cb, 0, sizeof(cb));
	cb.aio_lio_opcode = IOCB_CMD_POLL;
	cb.aio_fildes = (uint32_t)efd;
	cb.aio_buf = POLLIN;
	cb.aio_flags = IOCB_FLAG_RESFD;
	cb.aio_resfd = (uint32_t)efd;
	if (syscall(SYS_io_submit, ctx, 1, cbs) != 1) {
		printf("trigger: io_submit(IOCB_CMD_POLL): %s\n", strerror(errno));
		return 2;
	}
	printf("trigger: poll request queued; writing to the eventfd\n");
	fflush(stdout);
	if (write(efd, &one, sizeof(one)) != sizeof(one)) {
		printf("trigger: write: %s\n", strerror(errno));
		return 2;
	}
	printf("trigger: written: no recursion (the kernel is fixed)\n");
	return 0;
}
