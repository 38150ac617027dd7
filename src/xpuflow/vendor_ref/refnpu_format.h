/*
 * File formats shared by refnpu-compile and the refnpu runtime. All integers are little-endian.
 *
 * xpuflow MLP export ("XPFMLP01", written by xpuflow.vendor_ref.export.export_mlp):
 *   header, 24 bytes:  char magic[8] = "XPFMLP01"; u32 version = 1; u32 num_layers (1..64);
 *                      u32 dtype = 1 (float32); u32 reserved = 0
 *   layer table:       num_layers x { u32 in_dim; u32 out_dim; u32 activation (0 none, 1 relu);
 *                                     u32 reserved = 0 }
 *   tensors:           per layer, f32 W[in_dim][out_dim] (row-major, y = x @ W + b), f32 b[out_dim]
 *   The file ends right after the last tensor.
 *
 * refnpu engine ("RNPUENG1", written by refnpu-compile):
 *   header, 64 bytes:  char magic[8] = "RNPUENG1"; u32 format_version = 1; u32 target (1 = refnpu-v1);
 *                      u32 opt_level; u32 num_layers; u32 input_dim; u32 output_dim; u32 max_width;
 *                      u32 reserved; u64 payload_bytes; u32 crc32; u8 reserved[12]
 *   payload:           layer table, num_layers x { u32 in_dim; u32 out_dim; u32 activation;
 *                                                  u32 layout (0: W[in][out], 1: W[out][in]) },
 *                      then per layer its weights in that layout and its bias, f32
 *   crc32 (IEEE, as zlib.crc32) covers header bytes 0..47 followed by the payload.
 */
#ifndef REFNPU_FORMAT_H
#define REFNPU_FORMAT_H

#include <stddef.h>
#include <stdint.h>

#define XPF_MLP_MAGIC "XPFMLP01"
#define XPF_MLP_VERSION 1u
#define XPF_MLP_HEADER_BYTES 24u
#define XPF_LAYER_ENTRY_BYTES 16u
#define XPF_DTYPE_F32 1u
#define XPF_MAX_LAYERS 64u
#define XPF_MAX_DIM 65536u
#define XPF_ACT_NONE 0u
#define XPF_ACT_RELU 1u

#define RNPU_ENGINE_MAGIC "RNPUENG1"
#define RNPU_ENGINE_VERSION 1u
#define RNPU_ENGINE_HEADER_BYTES 64u
#define RNPU_CRC_HEADER_BYTES 48u
#define RNPU_TARGET_V1 1u
#define RNPU_TARGET_V1_NAME "refnpu-v1"
#define RNPU_LAYOUT_IN_OUT 0u
#define RNPU_LAYOUT_OUT_IN 1u
#define RNPU_MAX_FILE_BYTES ((size_t)1 << 30)

/* One dense layer: weights in `layout`, then the bias; both point into an owned float buffer. */
typedef struct {
    uint32_t in_dim;
    uint32_t out_dim;
    uint32_t activation;
    uint32_t layout;
    const float *weights;
    const float *bias;
} rnpu_layer;

uint32_t rnpu_crc32(uint32_t crc, const unsigned char *data, size_t len);
uint32_t rnpu_get_u32(const unsigned char *p);
uint64_t rnpu_get_u64(const unsigned char *p);
float rnpu_get_f32(const unsigned char *p);
void rnpu_put_u32(unsigned char *p, uint32_t v);
void rnpu_put_u64(unsigned char *p, uint64_t v);
void rnpu_put_f32(unsigned char *p, float v);

/* Read a whole file into a malloc'ed buffer. Returns 0, or an errno value (EFBIG past max_bytes). */
int rnpu_read_file(const char *path, size_t max_bytes, unsigned char **data, size_t *size);

#endif /* REFNPU_FORMAT_H */
