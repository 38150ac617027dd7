/* Byte-order helpers, CRC-32 and whole-file reads shared by refnpu-compile and the runtime. */
#include "refnpu_format.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

uint32_t rnpu_crc32(uint32_t crc, const unsigned char *data, size_t len) {
    /* Bitwise IEEE CRC-32 (reflected, polynomial 0xEDB88320), identical to zlib.crc32. Engines are
     * small and this runs once per load, so a table would buy nothing. */
    crc = ~crc;
    for (size_t i = 0; i < len; i++) {
        crc ^= data[i];
        for (int k = 0; k < 8; k++) {
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
        }
    }
    return ~crc;
}

uint32_t rnpu_get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

uint64_t rnpu_get_u64(const unsigned char *p) {
    return (uint64_t)rnpu_get_u32(p) | ((uint64_t)rnpu_get_u32(p + 4) << 32);
}

float rnpu_get_f32(const unsigned char *p) {
    uint32_t bits = rnpu_get_u32(p);
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

void rnpu_put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v & 0xFFu);
    p[1] = (unsigned char)((v >> 8) & 0xFFu);
    p[2] = (unsigned char)((v >> 16) & 0xFFu);
    p[3] = (unsigned char)((v >> 24) & 0xFFu);
}

void rnpu_put_u64(unsigned char *p, uint64_t v) {
    rnpu_put_u32(p, (uint32_t)(v & 0xFFFFFFFFu));
    rnpu_put_u32(p + 4, (uint32_t)(v >> 32));
}

void rnpu_put_f32(unsigned char *p, float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    rnpu_put_u32(p, bits);
}

int rnpu_read_file(const char *path, size_t max_bytes, unsigned char **data, size_t *size) {
    *data = NULL;
    *size = 0;
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return errno != 0 ? errno : EIO;
    }
    size_t capacity = 1u << 16;
    size_t used = 0;
    unsigned char *buf = malloc(capacity);
    if (buf == NULL) {
        fclose(f);
        return ENOMEM;
    }
    for (;;) {
        if (used == capacity) {
            if (capacity >= max_bytes) {
                free(buf);
                fclose(f);
                return EFBIG;
            }
            size_t grown = capacity * 2 > max_bytes ? max_bytes : capacity * 2;
            unsigned char *bigger = realloc(buf, grown);
            if (bigger == NULL) {
                free(buf);
                fclose(f);
                return ENOMEM;
            }
            buf = bigger;
            capacity = grown;
        }
        size_t got = fread(buf + used, 1, capacity - used, f);
        used += got;
        if (got == 0) {
            break;
        }
    }
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        free(buf);
        return EIO;
    }
    *data = buf;
    *size = used;
    return 0;
}
