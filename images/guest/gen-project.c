// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * gen-project: writes a C project for the compile workload (KRR measured a
 * kernel build; this is a smaller one that a software CPU finishes in
 * seconds): FILES translation units with a few functions each, a main.c
 * calling them all, and a Makefile, so that `make -j$(nproc) -C DIR` forks
 * and execs the compiler per file, reads headers, writes objects and links,
 * the kernel work of a real build.
 *
 * Usage: gen-project DIR FILES
 *
 * The generated sources depend only on FILES, so every run compiles the
 * same code; the built program prints "checksum: N" when run.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static FILE *create(const char *dir, const char *name)
{
	char path[4096];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "w");
	if (!f) {
		fprintf(stderr, "gen-project: %s: %s\n", path, strerror(errno));
		exit(1);
	}
	return f;
}

static void finish(FILE *f)
{
	if (fclose(f) != 0) {
		perror("gen-project: write");
		exit(1);
	}
}

/* One unit: a table, a struct and three functions with loops and branches,
 * enough for the optimiser to have work to do. */
static void unit(const char *dir, unsigned long i)
{
	char name[64];
	FILE *f;

	snprintf(name, sizeof(name), "unit%lu.c", i);
	f = create(dir, name);
	fprintf(f, "#include \"project.h\"\n#include <string.h>\n\n");
	fprintf(f, "static const unsigned table%lu[16] = {", i);
	for (int k = 0; k < 16; k++)
		fprintf(f, "%s%luu", k ? ", " : "", (i * 2654435761ul + k * 40503ul) & 0xffff);
	fprintf(f, "};\n\n");
	fprintf(f,
		"struct state%lu { unsigned long acc; unsigned char buf[64]; int n; };\n\n"
		"static unsigned long mix%lu(unsigned long x, int rounds)\n{\n"
		"\tfor (int r = 0; r < rounds; r++) {\n"
		"\t\tx ^= x << 13; x ^= x >> 7; x ^= x << 17;\n"
		"\t\tx += table%lu[(x >> 3) & 15];\n"
		"\t}\n\treturn x;\n}\n\n"
		"static void fill%lu(struct state%lu *s)\n{\n"
		"\tmemset(s->buf, 0, sizeof(s->buf));\n"
		"\tfor (s->n = 0; s->n < 64; s->n++)\n"
		"\t\ts->buf[s->n] = (unsigned char)mix%lu(s->acc + s->n, 3);\n}\n\n"
		"unsigned long unit%lu(unsigned long seed)\n{\n"
		"\tstruct state%lu s = { .acc = seed };\n"
		"\tfor (int round = 0; round < 4; round++) {\n"
		"\t\tfill%lu(&s);\n"
		"\t\tfor (int k = 0; k < 64; k++)\n"
		"\t\t\ts.acc = s.buf[k] & 1 ? mix%lu(s.acc, k & 7) : s.acc + s.buf[k];\n"
		"\t}\n\treturn s.acc;\n}\n",
		i, i, i, i, i, i, i, i, i, i);
	finish(f);
}

int main(int argc, char **argv)
{
	const char *dir;
	unsigned long files, i;
	char *end;
	FILE *f;

	if (argc != 3) {
		fprintf(stderr, "usage: gen-project DIR FILES\n");
		return 2;
	}
	dir = argv[1];
	files = strtoul(argv[2], &end, 10);
	if (*end || files == 0 || files > 100000) {
		fprintf(stderr, "gen-project: FILES must be 1..100000, got %s\n", argv[2]);
		return 2;
	}
	if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
		fprintf(stderr, "gen-project: %s: %s\n", dir, strerror(errno));
		return 1;
	}
	f = create(dir, "project.h");
	for (i = 0; i < files; i++)
		fprintf(f, "unsigned long unit%lu(unsigned long seed);\n", i);
	finish(f);
	for (i = 0; i < files; i++)
		unit(dir, i);
	f = create(dir, "main.c");
	fprintf(f, "#include <stdio.h>\n#include \"project.h\"\n\nint main(void)\n{\n"
		   "\tunsigned long sum = 0;\n");
	for (i = 0; i < files; i++)
		fprintf(f, "\tsum += unit%lu(%lu);\n", i, i);
	fprintf(f, "\tprintf(\"checksum: %%lu\\n\", sum);\n\treturn 0;\n}\n");
	finish(f);
	f = create(dir, "Makefile");
	fprintf(f, "CFLAGS = -O2\nOBJS = main.o");
	for (i = 0; i < files; i++)
		fprintf(f, " unit%lu.o", i);
	fprintf(f, "\n\nproject: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n\n"
		   "%%.o: %%.c project.h\n\t$(CC) $(CFLAGS) -c -o $@ $<\n\n"
		   "clean:\n\trm -f project $(OBJS)\n");
	finish(f);
	printf("gen-project: %lu units in %s\n", files, dir);
	return 0;
}
