/*
 * refnpu-compile: compiles an xpuflow MLP export into a refnpu engine file.
 *
 *   refnpu-compile --input model.xpfmlp --output model.rnpu [--opt-level 0|1|2]
 *                  [--target refnpu-v1] [--report report.json]
 *   refnpu-compile --version
 *
 * Exit status: 0 ok, 1 internal error, 2 usage error, 3 invalid input model, 4 cannot read or write
 * a file, 5 unsupported target or option. Errors are one line on stderr: "refnpu-compile: error: ...".
 *
 * Test hooks (never needed in production): --debug-sleep-s N forks a helper process and sleeps N
 * seconds before compiling (a hung vendor compiler with a child); --debug-pid-file PATH writes
 * "<pid> <child pid>" there first. If REFNPU_DEBUG_ARGV_FILE is set, the received argv is written
 * there, each argument followed by a NUL byte.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "refnpu.h"
#include "refnpu_format.h"

enum {
    EXIT_INTERNAL = 1,
    EXIT_USAGE = 2,
    EXIT_BAD_MODEL = 3,
    EXIT_IO = 4,
    EXIT_UNSUPPORTED = 5
};

static const char *const PROG = "refnpu-compile";

static void fail(int status, const char *fmt, ...) {
    va_list args;
    fprintf(stderr, "%s: error: ", PROG);
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fputc('\n', stderr);
    exit(status);
}

static void usage(FILE *out) {
    fprintf(out,
            "usage: %s --input MODEL --output ENGINE [--opt-level 0|1|2] [--target refnpu-v1]\n"
            "       %*s [--report REPORT.json]\n"
            "       %s --version\n",
            PROG, (int)strlen(PROG), "", PROG);
}

typedef struct {
    const char *input;
    const char *output;
    const char *report;
    const char *target;
    const char *pid_file;
    int opt_level;
    long debug_sleep_s;
} options;

static long parse_long(const char *flag, const char *text, long lo, long hi) {
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < lo || value > hi) {
        fail(EXIT_USAGE, "%s expects an integer in %ld..%ld, got '%s'", flag, lo, hi, text);
    }
    return value;
}

static options parse_args(int argc, char **argv) {
    options opt = {NULL, NULL, NULL, RNPU_TARGET_V1_NAME, NULL, 2, 0};
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--version") == 0) {
            printf("%s %s (target %s, engine format %u)\n", PROG, REFNPU_VERSION_STRING,
                   RNPU_TARGET_V1_NAME, RNPU_ENGINE_VERSION);
            exit(0);
        }
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            usage(stdout);
            exit(0);
        }
        if (i + 1 >= argc) {
            usage(stderr);
            fail(EXIT_USAGE, "unknown or incomplete argument '%s'", arg);
        }
        const char *value = argv[++i];
        if (strcmp(arg, "--input") == 0) {
            opt.input = value;
        } else if (strcmp(arg, "--output") == 0) {
            opt.output = value;
        } else if (strcmp(arg, "--report") == 0) {
            opt.report = value;
        } else if (strcmp(arg, "--target") == 0) {
            opt.target = value;
        } else if (strcmp(arg, "--opt-level") == 0) {
            opt.opt_level = (int)parse_long(arg, value, 0, 2);
        } else if (strcmp(arg, "--debug-sleep-s") == 0) {
            opt.debug_sleep_s = parse_long(arg, value, 0, 86400);
        } else if (strcmp(arg, "--debug-pid-file") == 0) {
            opt.pid_file = value;
        } else {
            usage(stderr);
            fail(EXIT_USAGE, "unknown argument '%s'", arg);
        }
    }
    if (opt.input == NULL || opt.output == NULL) {
        usage(stderr);
        fail(EXIT_USAGE, "--input and --output are required");
    }
    if (strcmp(opt.target, RNPU_TARGET_V1_NAME) != 0) {
        fail(EXIT_UNSUPPORTED, "unsupported target '%s'; this compiler supports: %s", opt.target,
             RNPU_TARGET_V1_NAME);
    }
    return opt;
}

static void dump_argv(int argc, char **argv) {
    const char *path = getenv("REFNPU_DEBUG_ARGV_FILE");
    if (path == NULL || *path == '\0') {
        return;
    }
    FILE *f = fopen(path, "wb");
    if (f == NULL) {
        fail(EXIT_IO, "cannot write REFNPU_DEBUG_ARGV_FILE '%s': %s", path, strerror(errno));
    }
    for (int i = 0; i < argc; i++) {
        fwrite(argv[i], 1, strlen(argv[i]) + 1, f);
    }
    fclose(f);
}

static void debug_hang(const options *opt) {
    if (opt->debug_sleep_s <= 0) {
        return;
    }
    fflush(NULL);
    pid_t child = fork();
    if (child < 0) {
        fail(EXIT_INTERNAL, "fork failed: %s", strerror(errno));
    }
    if (child == 0) {
        sleep((unsigned)opt->debug_sleep_s);
        _exit(0);
    }
    if (opt->pid_file != NULL) {
        FILE *f = fopen(opt->pid_file, "w");
        if (f == NULL) {
            fail(EXIT_IO, "cannot write --debug-pid-file '%s': %s", opt->pid_file, strerror(errno));
        }
        fprintf(f, "%ld %ld\n", (long)getpid(), (long)child);
        fclose(f);
    }
    fprintf(stderr, "%s: debug: sleeping %ld s\n", PROG, opt->debug_sleep_s);
    sleep((unsigned)opt->debug_sleep_s);
    waitpid(child, NULL, 0);
}

typedef struct {
    uint32_t num_layers;
    uint32_t input_dim;
    uint32_t output_dim;
    uint32_t max_width;
    uint64_t num_floats;
    rnpu_layer layers[XPF_MAX_LAYERS];
    float *storage;
} model;

/* Parse and validate an XPFMLP01 export; exits with EXIT_BAD_MODEL naming the first problem. */
static void parse_model(const unsigned char *data, size_t size, model *m) {
    if (size < XPF_MLP_HEADER_BYTES) {
        fail(EXIT_BAD_MODEL, "input is %zu bytes, shorter than the %u-byte header of an xpuflow MLP export",
             size, XPF_MLP_HEADER_BYTES);
    }
    if (memcmp(data, XPF_MLP_MAGIC, 8) != 0) {
        fail(EXIT_BAD_MODEL, "input is not an xpuflow MLP export (bad magic); write it with export_mlp()");
    }
    uint32_t version = rnpu_get_u32(data + 8);
    if (version != XPF_MLP_VERSION) {
        fail(EXIT_BAD_MODEL, "unsupported MLP export version %u; this compiler reads version %u", version,
             XPF_MLP_VERSION);
    }
    m->num_layers = rnpu_get_u32(data + 12);
    if (m->num_layers < 1 || m->num_layers > XPF_MAX_LAYERS) {
        fail(EXIT_BAD_MODEL, "num_layers is %u; it must be in 1..%u", m->num_layers, XPF_MAX_LAYERS);
    }
    uint32_t dtype = rnpu_get_u32(data + 16);
    if (dtype != XPF_DTYPE_F32) {
        fail(EXIT_BAD_MODEL, "dtype %u is not supported; only 1 (float32) is", dtype);
    }
    uint64_t table_end = XPF_MLP_HEADER_BYTES + (uint64_t)m->num_layers * XPF_LAYER_ENTRY_BYTES;
    if (size < table_end) {
        fail(EXIT_BAD_MODEL, "input is truncated inside its layer table (%zu of %llu bytes)", size,
             (unsigned long long)table_end);
    }
    m->num_floats = 0;
    m->max_width = 0;
    for (uint32_t i = 0; i < m->num_layers; i++) {
        const unsigned char *e = data + XPF_MLP_HEADER_BYTES + (size_t)i * XPF_LAYER_ENTRY_BYTES;
        rnpu_layer *layer = &m->layers[i];
        layer->in_dim = rnpu_get_u32(e);
        layer->out_dim = rnpu_get_u32(e + 4);
        layer->activation = rnpu_get_u32(e + 8);
        if (layer->in_dim < 1 || layer->in_dim > XPF_MAX_DIM || layer->out_dim < 1 ||
            layer->out_dim > XPF_MAX_DIM) {
            fail(EXIT_BAD_MODEL, "layer %u has shape %ux%u; each dimension must be in 1..%u", i,
                 layer->in_dim, layer->out_dim, XPF_MAX_DIM);
        }
        if (layer->activation != XPF_ACT_NONE && layer->activation != XPF_ACT_RELU) {
            fail(EXIT_BAD_MODEL, "layer %u has unknown activation %u (0 none, 1 relu)", i,
                 layer->activation);
        }
        if (rnpu_get_u32(e + 12) != 0) {
            fail(EXIT_BAD_MODEL, "layer %u: reserved field must be 0", i);
        }
        if (i > 0 && layer->in_dim != m->layers[i - 1].out_dim) {
            fail(EXIT_BAD_MODEL, "layer %u takes %u inputs but layer %u produces %u", i, layer->in_dim,
                 i - 1, m->layers[i - 1].out_dim);
        }
        m->num_floats += (uint64_t)layer->in_dim * layer->out_dim + layer->out_dim;
        if (layer->in_dim > m->max_width) m->max_width = layer->in_dim;
        if (layer->out_dim > m->max_width) m->max_width = layer->out_dim;
    }
    m->input_dim = m->layers[0].in_dim;
    m->output_dim = m->layers[m->num_layers - 1].out_dim;
    uint64_t expected = table_end + m->num_floats * 4u;
    if ((uint64_t)size != expected) {
        fail(EXIT_BAD_MODEL, "input is %zu bytes but its layer table describes %llu bytes (%s)", size,
             (unsigned long long)expected, (uint64_t)size < expected ? "truncated" : "trailing data");
    }
    m->storage = malloc((size_t)m->num_floats * sizeof(float));
    if (m->storage == NULL) {
        fail(EXIT_INTERNAL, "out of memory for %llu weights", (unsigned long long)m->num_floats);
    }
    const unsigned char *p = data + table_end;
    float *dst = m->storage;
    for (uint32_t i = 0; i < m->num_layers; i++) {
        rnpu_layer *layer = &m->layers[i];
        size_t count = (size_t)layer->in_dim * layer->out_dim + layer->out_dim;
        for (size_t k = 0; k < count; k++, p += 4) {
            dst[k] = rnpu_get_f32(p);
            if (!isfinite(dst[k])) {
                fail(EXIT_BAD_MODEL, "layer %u %s %zu is not finite (NaN or Inf)", i,
                     k < (size_t)layer->in_dim * layer->out_dim ? "weight" : "bias",
                     k < (size_t)layer->in_dim * layer->out_dim ? k : k - (size_t)layer->in_dim * layer->out_dim);
            }
        }
        layer->weights = dst;
        layer->bias = dst + (size_t)layer->in_dim * layer->out_dim;
        dst += count;
    }
}

/* Serialize the engine: opt-level 0 keeps W[in][out]; 1 and 2 transpose to W[out][in] so every
 * output is a contiguous dot product, and 2 also tells the runtime to use its unrolled kernel. */
static unsigned char *build_engine(const model *m, int opt_level, size_t *engine_bytes) {
    uint32_t layout = opt_level == 0 ? RNPU_LAYOUT_IN_OUT : RNPU_LAYOUT_OUT_IN;
    uint64_t payload = (uint64_t)m->num_layers * XPF_LAYER_ENTRY_BYTES + m->num_floats * 4u;
    size_t total = RNPU_ENGINE_HEADER_BYTES + (size_t)payload;
    unsigned char *buf = calloc(1, total);
    if (buf == NULL) {
        fail(EXIT_INTERNAL, "out of memory for a %zu-byte engine", total);
    }
    memcpy(buf, RNPU_ENGINE_MAGIC, 8);
    rnpu_put_u32(buf + 8, RNPU_ENGINE_VERSION);
    rnpu_put_u32(buf + 12, RNPU_TARGET_V1);
    rnpu_put_u32(buf + 16, (uint32_t)opt_level);
    rnpu_put_u32(buf + 20, m->num_layers);
    rnpu_put_u32(buf + 24, m->input_dim);
    rnpu_put_u32(buf + 28, m->output_dim);
    rnpu_put_u32(buf + 32, m->max_width);
    rnpu_put_u64(buf + 40, payload);
    unsigned char *p = buf + RNPU_ENGINE_HEADER_BYTES;
    for (uint32_t i = 0; i < m->num_layers; i++, p += XPF_LAYER_ENTRY_BYTES) {
        rnpu_put_u32(p, m->layers[i].in_dim);
        rnpu_put_u32(p + 4, m->layers[i].out_dim);
        rnpu_put_u32(p + 8, m->layers[i].activation);
        rnpu_put_u32(p + 12, layout);
    }
    for (uint32_t i = 0; i < m->num_layers; i++) {
        const rnpu_layer *layer = &m->layers[i];
        size_t in = layer->in_dim, out = layer->out_dim;
        for (size_t r = 0; r < (layout == RNPU_LAYOUT_IN_OUT ? in : out); r++) {
            for (size_t c = 0; c < (layout == RNPU_LAYOUT_IN_OUT ? out : in); c++, p += 4) {
                /* W is stored [in][out] in the export; OUT_IN reads it transposed. */
                float w = layout == RNPU_LAYOUT_IN_OUT ? layer->weights[r * out + c]
                                                       : layer->weights[c * out + r];
                rnpu_put_f32(p, w);
            }
        }
        for (size_t o = 0; o < out; o++, p += 4) {
            rnpu_put_f32(p, layer->bias[o]);
        }
    }
    uint32_t crc = rnpu_crc32(0, buf, RNPU_CRC_HEADER_BYTES);
    crc = rnpu_crc32(crc, buf + RNPU_ENGINE_HEADER_BYTES, (size_t)payload);
    rnpu_put_u32(buf + 48, crc);
    *engine_bytes = total;
    return buf;
}

/* Write via a temporary file and rename, so a killed compiler never leaves a half-written output. */
static void write_atomically(const char *path, const void *data, size_t size) {
    size_t tmp_len = strlen(path) + 32;
    char *tmp = malloc(tmp_len);
    if (tmp == NULL) {
        fail(EXIT_INTERNAL, "out of memory");
    }
    snprintf(tmp, tmp_len, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (f == NULL) {
        fail(EXIT_IO, "cannot write '%s': %s", path, strerror(errno));
    }
    int ok = fwrite(data, 1, size, f) == size;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        int err = errno;
        remove(tmp);
        fail(EXIT_IO, "cannot write '%s': %s", path, strerror(err));
    }
    free(tmp);
}

static void write_report(const char *path, const model *m, int opt_level, size_t engine_bytes) {
    size_t cap = 256 + (size_t)m->num_layers * 96;
    char *text = malloc(cap);
    if (text == NULL) {
        fail(EXIT_INTERNAL, "out of memory");
    }
    size_t n = (size_t)snprintf(text, cap,
                                "{\"target\": \"%s\", \"opt_level\": %d, \"input_dim\": %u, "
                                "\"output_dim\": %u, \"parameters\": %llu, \"engine_bytes\": %zu, "
                                "\"layers\": [",
                                RNPU_TARGET_V1_NAME, opt_level, m->input_dim, m->output_dim,
                                (unsigned long long)m->num_floats, engine_bytes);
    for (uint32_t i = 0; i < m->num_layers; i++) {
        n += (size_t)snprintf(text + n, cap - n, "%s{\"in\": %u, \"out\": %u, \"activation\": \"%s\"}",
                              i ? ", " : "", m->layers[i].in_dim, m->layers[i].out_dim,
                              m->layers[i].activation == XPF_ACT_RELU ? "relu" : "none");
    }
    n += (size_t)snprintf(text + n, cap - n, "]}\n");
    write_atomically(path, text, n);
    free(text);
}

int main(int argc, char **argv) {
    dump_argv(argc, argv);
    options opt = parse_args(argc, argv);
    debug_hang(&opt);

    unsigned char *data = NULL;
    size_t size = 0;
    int err = rnpu_read_file(opt.input, RNPU_MAX_FILE_BYTES, &data, &size);
    if (err != 0) {
        fail(err == ENOMEM ? EXIT_INTERNAL : EXIT_IO, "cannot read input '%s': %s", opt.input,
             strerror(err));
    }
    model m;
    parse_model(data, size, &m);
    free(data);

    size_t engine_bytes = 0;
    unsigned char *engine = build_engine(&m, opt.opt_level, &engine_bytes);
    write_atomically(opt.output, engine, engine_bytes);
    if (opt.report != NULL) {
        write_report(opt.report, &m, opt.opt_level, engine_bytes);
    }
    free(engine);
    free(m.storage);
    return 0;
}
