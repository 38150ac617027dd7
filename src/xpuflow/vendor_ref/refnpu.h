/*
 * refnpu: the xpuflow reference vendor stack.
 *
 * A small "NPU" SDK written in C the way binary-only vendor stacks are shipped: a compiler CLI
 * (refnpu-compile) that turns an exported model into an engine file, and a runtime library
 * (librefnpu_runtime.so) with a C API that loads engines and runs them. The "device" is emulated
 * on the host CPU: the runtime really computes the network (dense layers + ReLU) in C.
 *
 * Every API function returns REFNPU_OK (0) or a negative error code below; after a failure,
 * refnpu_last_error() returns a message describing it for the calling thread.
 *
 *   refnpu_device *dev; refnpu_engine *eng;
 *   if (refnpu_open(0, &dev) != REFNPU_OK) puts(refnpu_last_error());
 *   refnpu_load_engine(dev, "model.rnpu", &eng);
 *   refnpu_run(eng, input, batch, in_dim, output, out_dim);
 *   refnpu_unload(eng);
 *   refnpu_close(dev);
 */
#ifndef REFNPU_H
#define REFNPU_H

#ifdef __cplusplus
extern "C" {
#endif

#define REFNPU_VERSION_STRING "1.0.0"
#define REFNPU_NUM_DEVICES 1

enum refnpu_status {
    REFNPU_OK = 0,
    REFNPU_E_BAD_ARGUMENT = -1, /* a NULL pointer, a negative size, a device or engine already freed */
    REFNPU_E_IO = -2,           /* the engine file cannot be opened or read */
    REFNPU_E_BAD_MAGIC = -3,    /* the file is not a refnpu engine */
    REFNPU_E_UNSUPPORTED = -4,  /* engine format version or target this runtime does not support */
    REFNPU_E_CHECKSUM = -5,     /* the engine's CRC-32 does not match its contents */
    REFNPU_E_CORRUPT = -6,      /* truncated engine or inconsistent layer table */
    REFNPU_E_SHAPE = -7,        /* input/output dimensions do not match the engine */
    REFNPU_E_NO_MEMORY = -8,    /* an allocation failed */
    REFNPU_E_NO_DEVICE = -9,    /* no device with that index */
    REFNPU_E_BUSY = -10         /* the device still has engines loaded */
};

typedef struct refnpu_device refnpu_device;
typedef struct refnpu_engine refnpu_engine;

/* Open device `device_index` (0 .. REFNPU_NUM_DEVICES-1). */
int refnpu_open(int device_index, refnpu_device **out);

/* Load, validate (magic, version, target, CRC-32, layer table) and keep an engine in memory. */
int refnpu_load_engine(refnpu_device *device, const char *path, refnpu_engine **out);

/* Run `batch` rows of `in_dim` float32 inputs (row-major) into `batch` rows of `out_dim` outputs. */
int refnpu_run(refnpu_engine *engine, const float *input, int batch, int in_dim, float *output,
               int out_dim);

/* The message of the last failed call on this thread ("" when the last call succeeded). */
const char *refnpu_last_error(void);

/* Free an engine. */
int refnpu_unload(refnpu_engine *engine);

/* Close a device; every engine loaded on it must be unloaded first (else REFNPU_E_BUSY). */
int refnpu_close(refnpu_device *device);

/* The runtime's version, e.g. "1.0.0". */
const char *refnpu_version(void);

#ifdef __cplusplus
}
#endif

#endif /* REFNPU_H */
