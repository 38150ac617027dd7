/*
 * librefnpu_runtime: loads refnpu engines and runs them on the (host-emulated) refnpu device.
 * See refnpu.h for the API and error codes, refnpu_format.h for the engine file format.
 *
 * Thread safety: distinct engines may run on distinct threads; one engine must not run on two
 * threads at once. The last error is kept per thread.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "refnpu.h"
#include "refnpu_format.h"

#if defined(__GNUC__) || defined(__clang__)
#define REFNPU_EXPORT __attribute__((visibility("default")))
#else
#define REFNPU_EXPORT
#endif

/* Tags let the API refuse pointers that are not (or no longer) live handles, best effort. */
#define DEVICE_TAG 0x52444556u /* "RDEV" */
#define ENGINE_TAG 0x52454e47u /* "RENG" */

struct refnpu_device {
    uint32_t tag;
    int index;
    int engines_loaded;
};

struct refnpu_engine {
    uint32_t tag;
    refnpu_device *device;
    uint32_t opt_level;
    uint32_t num_layers;
    uint32_t input_dim;
    uint32_t output_dim;
    uint32_t max_width;
    rnpu_layer layers[XPF_MAX_LAYERS];
    float *storage;
};

static _Thread_local char last_error[512];

static int set_error(int code, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    return code;
}

static void clear_error(void) { last_error[0] = '\0'; }

REFNPU_EXPORT const char *refnpu_last_error(void) { return last_error; }

REFNPU_EXPORT const char *refnpu_version(void) { return REFNPU_VERSION_STRING; }

REFNPU_EXPORT int refnpu_open(int device_index, refnpu_device **out) {
    clear_error();
    if (out == NULL) {
        return set_error(REFNPU_E_BAD_ARGUMENT, "refnpu_open: out is NULL");
    }
    *out = NULL;
    if (device_index < 0 || device_index >= REFNPU_NUM_DEVICES) {
        return set_error(REFNPU_E_NO_DEVICE, "no refnpu device %d (this host has %d: 0..%d)", device_index,
                         REFNPU_NUM_DEVICES, REFNPU_NUM_DEVICES - 1);
    }
    refnpu_device *device = calloc(1, sizeof *device);
    if (device == NULL) {
        return set_error(REFNPU_E_NO_MEMORY, "refnpu_open: out of memory");
    }
    device->tag = DEVICE_TAG;
    device->index = device_index;
    *out = device;
    return REFNPU_OK;
}

REFNPU_EXPORT int refnpu_close(refnpu_device *device) {
    clear_error();
    if (device == NULL || device->tag != DEVICE_TAG) {
        return set_error(REFNPU_E_BAD_ARGUMENT, "refnpu_close: not an open device");
    }
    if (device->engines_loaded > 0) {
        return set_error(REFNPU_E_BUSY, "refnpu_close: device %d still has %d engine(s) loaded; unload them first",
                         device->index, device->engines_loaded);
    }
    device->tag = 0;
    free(device);
    return REFNPU_OK;
}

/* Validate the header and payload of an engine image and build its layer views. */
static int parse_engine(const char *path, const unsigned char *data, size_t size, refnpu_engine *e) {
    if (size < RNPU_ENGINE_HEADER_BYTES) {
        return set_error(REFNPU_E_CORRUPT, "'%s' is %zu bytes, shorter than the %u-byte engine header", path,
                         size, RNPU_ENGINE_HEADER_BYTES);
    }
    if (memcmp(data, RNPU_ENGINE_MAGIC, 8) != 0) {
        return set_error(REFNPU_E_BAD_MAGIC, "'%s' is not a refnpu engine (bad magic)", path);
    }
    uint32_t version = rnpu_get_u32(data + 8);
    uint32_t target = rnpu_get_u32(data + 12);
    if (version != RNPU_ENGINE_VERSION) {
        return set_error(REFNPU_E_UNSUPPORTED, "'%s' has engine format %u; this runtime reads format %u", path,
                         version, RNPU_ENGINE_VERSION);
    }
    if (target != RNPU_TARGET_V1) {
        return set_error(REFNPU_E_UNSUPPORTED, "'%s' targets device %u; this runtime drives %s (1)", path, target,
                         RNPU_TARGET_V1_NAME);
    }
    uint64_t payload = rnpu_get_u64(data + 40);
    if (payload != (uint64_t)(size - RNPU_ENGINE_HEADER_BYTES)) {
        return set_error(REFNPU_E_CORRUPT, "'%s' declares a %llu-byte payload but holds %zu bytes (truncated?)",
                         path, (unsigned long long)payload, size - RNPU_ENGINE_HEADER_BYTES);
    }
    uint32_t stored_crc = rnpu_get_u32(data + 48);
    uint32_t crc = rnpu_crc32(0, data, RNPU_CRC_HEADER_BYTES);
    crc = rnpu_crc32(crc, data + RNPU_ENGINE_HEADER_BYTES, (size_t)payload);
    if (crc != stored_crc) {
        return set_error(REFNPU_E_CHECKSUM, "'%s' fails its checksum (stored %08x, computed %08x); rebuild it",
                         path, stored_crc, crc);
    }
    e->opt_level = rnpu_get_u32(data + 16);
    e->num_layers = rnpu_get_u32(data + 20);
    e->input_dim = rnpu_get_u32(data + 24);
    e->output_dim = rnpu_get_u32(data + 28);
    e->max_width = rnpu_get_u32(data + 32);
    if (e->num_layers < 1 || e->num_layers > XPF_MAX_LAYERS || e->opt_level > 2) {
        return set_error(REFNPU_E_CORRUPT, "'%s' has %u layers at opt-level %u; expected 1..%u layers, level 0..2",
                         path, e->num_layers, e->opt_level, XPF_MAX_LAYERS);
    }
    uint64_t table = (uint64_t)e->num_layers * XPF_LAYER_ENTRY_BYTES;
    if (payload < table) {
        return set_error(REFNPU_E_CORRUPT, "'%s' is truncated inside its layer table", path);
    }
    uint64_t floats = 0;
    uint32_t widest = 0;
    const unsigned char *entry = data + RNPU_ENGINE_HEADER_BYTES;
    for (uint32_t i = 0; i < e->num_layers; i++, entry += XPF_LAYER_ENTRY_BYTES) {
        rnpu_layer *layer = &e->layers[i];
        layer->in_dim = rnpu_get_u32(entry);
        layer->out_dim = rnpu_get_u32(entry + 4);
        layer->activation = rnpu_get_u32(entry + 8);
        layer->layout = rnpu_get_u32(entry + 12);
        int chained = i == 0 ? layer->in_dim == e->input_dim : layer->in_dim == e->layers[i - 1].out_dim;
        if (layer->in_dim < 1 || layer->in_dim > XPF_MAX_DIM || layer->out_dim < 1 ||
            layer->out_dim > XPF_MAX_DIM || layer->activation > XPF_ACT_RELU ||
            layer->layout > RNPU_LAYOUT_OUT_IN || !chained) {
            return set_error(REFNPU_E_CORRUPT, "'%s': layer %u (%ux%u) is inconsistent with the engine", path, i,
                             layer->in_dim, layer->out_dim);
        }
        floats += (uint64_t)layer->in_dim * layer->out_dim + layer->out_dim;
        if (layer->in_dim > widest) widest = layer->in_dim;
        if (layer->out_dim > widest) widest = layer->out_dim;
    }
    if (e->layers[e->num_layers - 1].out_dim != e->output_dim || widest != e->max_width ||
        table + floats * 4u != payload) {
        return set_error(REFNPU_E_CORRUPT, "'%s': layer table does not match the header or payload size", path);
    }
    e->storage = malloc((size_t)floats * sizeof(float));
    if (e->storage == NULL) {
        return set_error(REFNPU_E_NO_MEMORY, "out of memory for %llu weights", (unsigned long long)floats);
    }
    const unsigned char *p = data + RNPU_ENGINE_HEADER_BYTES + table;
    float *dst = e->storage;
    for (uint32_t i = 0; i < e->num_layers; i++) {
        rnpu_layer *layer = &e->layers[i];
        size_t nw = (size_t)layer->in_dim * layer->out_dim;
        for (size_t k = 0; k < nw + layer->out_dim; k++, p += 4) {
            dst[k] = rnpu_get_f32(p);
        }
        layer->weights = dst;
        layer->bias = dst + nw;
        dst += nw + layer->out_dim;
    }
    return REFNPU_OK;
}

REFNPU_EXPORT int refnpu_load_engine(refnpu_device *device, const char *path, refnpu_engine **out) {
    clear_error();
    if (out == NULL || path == NULL || device == NULL || device->tag != DEVICE_TAG) {
        return set_error(REFNPU_E_BAD_ARGUMENT, "refnpu_load_engine: needs an open device, a path and out");
    }
    *out = NULL;
    unsigned char *data = NULL;
    size_t size = 0;
    int err = rnpu_read_file(path, RNPU_MAX_FILE_BYTES, &data, &size);
    if (err == ENOMEM) {
        return set_error(REFNPU_E_NO_MEMORY, "out of memory reading '%s'", path);
    }
    if (err != 0) {
        return set_error(REFNPU_E_IO, "cannot read engine '%s': %s", path, strerror(err));
    }
    refnpu_engine *engine = calloc(1, sizeof *engine);
    if (engine == NULL) {
        free(data);
        return set_error(REFNPU_E_NO_MEMORY, "refnpu_load_engine: out of memory");
    }
    int status = parse_engine(path, data, size, engine);
    free(data);
    if (status != REFNPU_OK) {
        free(engine->storage);
        free(engine);
        return status;
    }
    engine->tag = ENGINE_TAG;
    engine->device = device;
    device->engines_loaded++;
    *out = engine;
    return REFNPU_OK;
}

REFNPU_EXPORT int refnpu_unload(refnpu_engine *engine) {
    clear_error();
    if (engine == NULL || engine->tag != ENGINE_TAG) {
        return set_error(REFNPU_E_BAD_ARGUMENT, "refnpu_unload: not a loaded engine");
    }
    engine->device->engines_loaded--;
    engine->tag = 0;
    free(engine->storage);
    free(engine);
    return REFNPU_OK;
}

/* y[b][o] = act(bias[o] + sum_i x[b][i] * W(i, o)) for one layer. */
static void dense(const rnpu_layer *layer, uint32_t opt_level, const float *x, size_t batch, float *y) {
    size_t in = layer->in_dim, out = layer->out_dim;
    for (size_t b = 0; b < batch; b++) {
        const float *xb = x + b * in;
        float *yb = y + b * out;
        if (layer->layout == RNPU_LAYOUT_IN_OUT) {
            for (size_t o = 0; o < out; o++) yb[o] = layer->bias[o];
            for (size_t i = 0; i < in; i++) {
                const float xi = xb[i];
                const float *row = layer->weights + i * out;
                for (size_t o = 0; o < out; o++) yb[o] += xi * row[o];
            }
        } else {
            for (size_t o = 0; o < out; o++) {
                const float *w = layer->weights + o * in;
                float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f, acc3 = 0.0f;
                size_t i = 0;
                if (opt_level >= 2) {
                    /* Four independent accumulators: the dependency chain of one sum limits speed. */
                    for (; i + 4 <= in; i += 4) {
                        acc0 += xb[i] * w[i];
                        acc1 += xb[i + 1] * w[i + 1];
                        acc2 += xb[i + 2] * w[i + 2];
                        acc3 += xb[i + 3] * w[i + 3];
                    }
                }
                for (; i < in; i++) acc0 += xb[i] * w[i];
                yb[o] = layer->bias[o] + ((acc0 + acc1) + (acc2 + acc3));
            }
        }
        if (layer->activation == XPF_ACT_RELU) {
            for (size_t o = 0; o < out; o++) yb[o] = yb[o] > 0.0f ? yb[o] : 0.0f;
        }
    }
}

REFNPU_EXPORT int refnpu_run(refnpu_engine *engine, const float *input, int batch, int in_dim, float *output,
                             int out_dim) {
    clear_error();
    if (engine == NULL || engine->tag != ENGINE_TAG || input == NULL || output == NULL) {
        return set_error(REFNPU_E_BAD_ARGUMENT, "refnpu_run: needs a loaded engine, input and output");
    }
    if (batch < 1) {
        return set_error(REFNPU_E_BAD_ARGUMENT, "refnpu_run: batch must be >= 1, got %d", batch);
    }
    if (in_dim != (int)engine->input_dim || out_dim != (int)engine->output_dim) {
        return set_error(REFNPU_E_SHAPE, "refnpu_run: engine maps %u -> %u values per row, got in_dim %d, out_dim %d",
                         engine->input_dim, engine->output_dim, in_dim, out_dim);
    }
    size_t rows = (size_t)batch;
    if (rows > SIZE_MAX / sizeof(float) / 2 / engine->max_width) {
        return set_error(REFNPU_E_BAD_ARGUMENT, "refnpu_run: batch %d is too large", batch);
    }
    float *scratch = malloc(2 * rows * engine->max_width * sizeof(float));
    if (scratch == NULL) {
        return set_error(REFNPU_E_NO_MEMORY, "refnpu_run: out of memory for a batch of %d", batch);
    }
    float *ping = scratch, *pong = scratch + rows * engine->max_width;
    const float *x = input;
    for (uint32_t i = 0; i < engine->num_layers; i++) {
        float *y = (i + 1 == engine->num_layers) ? output : (x == ping ? pong : ping);
        dense(&engine->layers[i], engine->opt_level, x, rows, y);
        x = y;
    }
    free(scratch);
    return REFNPU_OK;
}
