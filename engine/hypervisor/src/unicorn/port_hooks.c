// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Unicorn's IN/OUT instruction hooks for the software-CPU backend. Each calls
 * the engine's handler (hooks.rs), which returns the CPU to leave translated
 * code through when the access must stop the vCPU, or NULL. The siglongjmp of
 * QEMU's cpu_loop_exit_noexc then starts here, so it skips only C frames and
 * never a Rust one.
 */
#include <stddef.h>
#include <stdint.h>

struct uc_struct;

void cpu_loop_exit_noexc_x86_64(void *cpu) __attribute__((noreturn));

void *krr_port_in(struct uc_struct *uc, uint32_t port, int size, void *ud, uint32_t *value);
void *krr_port_out(struct uc_struct *uc, uint32_t port, int size, uint32_t value, void *ud);

/* uc_cb_insn_in_t */
uint32_t krr_on_in(struct uc_struct *uc, uint32_t port, int size, void *ud)
{
	uint32_t value = UINT32_MAX;
	void *leave = krr_port_in(uc, port, size, ud, &value);

	if (leave != NULL)
		cpu_loop_exit_noexc_x86_64(leave);
	return value;
}

/* uc_cb_insn_out_t */
void krr_on_out(struct uc_struct *uc, uint32_t port, int size, uint32_t value, void *ud)
{
	void *leave = krr_port_out(uc, port, size, value, ud);

	if (leave != NULL)
		cpu_loop_exit_noexc_x86_64(leave);
}
