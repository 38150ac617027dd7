/*
 * Word lookups of the complexity scorer, in C: the one part of scoring that Python does a word at a
 * time (making a bytes object per word, hashing it, probing two sets, fetching weights).
 *
 * Lexicon(words, masks, weights, num_experts)
 *   words:   list of bytes, distinct
 *   masks:   list of int, one per word: bit i set when the word is a cue of cue set i (0..15)
 *   weights: list of float, num_experts per word, word-major; NaN when the word is not in that
 *            expert's vocabulary
 *
 * Lexicon.scan(text) -> (cue_counts, sums, counts)
 *   text is a bytes object of space-separated words (complexity_features translates the prompt so
 *   that every ASCII non-letter is a space). Each distinct word of the text that is in the lexicon
 *   counts once: cue_counts[i] is the number of distinct words with bit i, sums[e] the sum of expert
 *   e's weights over its distinct words found, counts[e] their number.
 *
 * The table is open addressing (FNV-1a, linear probing, at most half full); a per-word generation
 * stamp makes "distinct" cost nothing: a word already seen in this scan has the current stamp.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_CUES 16

typedef struct {
    PyObject_HEAD
    Py_ssize_t num_words;
    int num_experts;
    Py_ssize_t capacity; /* power of two */
    int32_t *slots;      /* word index + 1, 0 = empty */
    uint64_t *hashes;    /* per word */
    Py_ssize_t *offsets; /* per word, into blob */
    Py_ssize_t *lengths; /* per word */
    char *blob;
    uint32_t *masks;  /* per word */
    double *weights;  /* num_words * num_experts */
    uint32_t *stamps; /* per word */
    uint32_t generation;
} Lexicon;

static uint64_t fnv1a(const unsigned char *p, Py_ssize_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static void lexicon_free_tables(Lexicon *self) {
    PyMem_Free(self->slots);
    PyMem_Free(self->hashes);
    PyMem_Free(self->offsets);
    PyMem_Free(self->lengths);
    PyMem_Free(self->blob);
    PyMem_Free(self->masks);
    PyMem_Free(self->weights);
    PyMem_Free(self->stamps);
    self->slots = NULL;
    self->hashes = NULL;
    self->offsets = NULL;
    self->lengths = NULL;
    self->blob = NULL;
    self->masks = NULL;
    self->weights = NULL;
    self->stamps = NULL;
}

static void lexicon_dealloc(Lexicon *self) {
    lexicon_free_tables(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t find(const Lexicon *self, const unsigned char *p, Py_ssize_t n, uint64_t h) {
    Py_ssize_t mask = self->capacity - 1;
    Py_ssize_t i = (Py_ssize_t)(h & (uint64_t)mask);
    for (;;) {
        int32_t s = self->slots[i];
        if (s == 0) return -1;
        Py_ssize_t w = s - 1;
        if (self->hashes[w] == h && self->lengths[w] == n &&
            memcmp(self->blob + self->offsets[w], p, (size_t)n) == 0)
            return w;
        i = (i + 1) & mask;
    }
}

static int lexicon_init(Lexicon *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"words", "masks", "weights", "num_experts", NULL};
    PyObject *words, *masks, *weights;
    int num_experts;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!O!i", kwlist, &PyList_Type, &words, &PyList_Type,
                                     &masks, &PyList_Type, &weights, &num_experts))
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(words);
    if (num_experts < 1 || num_experts > 8) {
        PyErr_SetString(PyExc_ValueError, "num_experts must be 1..8");
        return -1;
    }
    if (PyList_GET_SIZE(masks) != n || PyList_GET_SIZE(weights) != n * num_experts) {
        PyErr_SetString(PyExc_ValueError, "masks needs one int per word and weights num_experts floats per word");
        return -1;
    }
    if (n >= INT32_MAX / 4) {
        PyErr_SetString(PyExc_ValueError, "too many words");
        return -1;
    }
    lexicon_free_tables(self);
    Py_ssize_t capacity = 16;
    while (capacity < 2 * n + 2) capacity <<= 1;
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *w = PyList_GET_ITEM(words, i);
        if (!PyBytes_Check(w)) {
            PyErr_SetString(PyExc_TypeError, "words must be bytes");
            return -1;
        }
        total += PyBytes_GET_SIZE(w);
    }
    self->num_words = n;
    self->num_experts = num_experts;
    self->capacity = capacity;
    self->generation = 0;
    self->slots = PyMem_Calloc((size_t)capacity, sizeof(int32_t));
    self->hashes = PyMem_Malloc(sizeof(uint64_t) * (size_t)(n + 1));
    self->offsets = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n + 1));
    self->lengths = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n + 1));
    self->blob = PyMem_Malloc((size_t)total + 1);
    self->masks = PyMem_Malloc(sizeof(uint32_t) * (size_t)(n + 1));
    self->weights = PyMem_Malloc(sizeof(double) * (size_t)(n * num_experts + 1));
    self->stamps = PyMem_Calloc((size_t)(n + 1), sizeof(uint32_t));
    if (!self->slots || !self->hashes || !self->offsets || !self->lengths || !self->blob || !self->masks ||
        !self->weights || !self->stamps) {
        lexicon_free_tables(self);
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t offset = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *w = PyList_GET_ITEM(words, i);
        Py_ssize_t len = PyBytes_GET_SIZE(w);
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(w);
        memcpy(self->blob + offset, p, (size_t)len);
        self->offsets[i] = offset;
        self->lengths[i] = len;
        offset += len;
        uint64_t h = fnv1a(p, len);
        self->hashes[i] = h;
        if (find(self, p, len, h) >= 0) {
            lexicon_free_tables(self);
            PyErr_Format(PyExc_ValueError, "word %zd is a duplicate", i);
            return -1;
        }
        Py_ssize_t slot = (Py_ssize_t)(h & (uint64_t)(capacity - 1));
        while (self->slots[slot] != 0) slot = (slot + 1) & (capacity - 1);
        self->slots[slot] = (int32_t)(i + 1);
        unsigned long m = PyLong_AsUnsignedLong(PyList_GET_ITEM(masks, i));
        if (m == (unsigned long)-1 && PyErr_Occurred()) {
            lexicon_free_tables(self);
            return -1;
        }
        if (m >> MAX_CUES) {
            lexicon_free_tables(self);
            PyErr_SetString(PyExc_ValueError, "a mask has bits beyond the 16 cue sets");
            return -1;
        }
        self->masks[i] = (uint32_t)m;
        for (int e = 0; e < num_experts; e++) {
            double v = PyFloat_AsDouble(PyList_GET_ITEM(weights, i * num_experts + e));
            if (v == -1.0 && PyErr_Occurred()) {
                lexicon_free_tables(self);
                return -1;
            }
            self->weights[i * num_experts + e] = v;
        }
    }
    return 0;
}

static PyObject *lexicon_scan(Lexicon *self, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "scan() takes bytes");
        return NULL;
    }
    if (self->slots == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Lexicon was not initialised");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    long cue_counts[MAX_CUES] = {0};
    double sums[8] = {0};
    long counts[8] = {0};
    int num_experts = self->num_experts;
    uint32_t gen = ++self->generation;
    if (gen == 0) { /* wrapped: forget every stamp */
        memset(self->stamps, 0, sizeof(uint32_t) * (size_t)self->num_words);
        gen = self->generation = 1;
    }
    Py_ssize_t i = 0;
    while (i < n) {
        while (i < n && p[i] == ' ') i++;
        Py_ssize_t start = i;
        uint64_t h = 1469598103934665603ULL;
        while (i < n && p[i] != ' ') {
            h ^= p[i];
            h *= 1099511628211ULL;
            i++;
        }
        Py_ssize_t len = i - start;
        if (len == 0) break;
        Py_ssize_t w = find(self, p + start, len, h);
        if (w < 0 || self->stamps[w] == gen) continue;
        self->stamps[w] = gen;
        uint32_t m = self->masks[w];
        for (int b = 0; m; b++, m >>= 1)
            if (m & 1u) cue_counts[b]++;
        const double *wt = self->weights + w * num_experts;
        for (int e = 0; e < num_experts; e++) {
            if (!isnan(wt[e])) {
                sums[e] += wt[e];
                counts[e]++;
            }
        }
    }
    PyObject *cues = PyTuple_New(MAX_CUES);
    PyObject *s = PyTuple_New(num_experts);
    PyObject *c = PyTuple_New(num_experts);
    if (!cues || !s || !c) goto fail;
    for (int b = 0; b < MAX_CUES; b++) {
        PyObject *v = PyLong_FromLong(cue_counts[b]);
        if (!v) goto fail;
        PyTuple_SET_ITEM(cues, b, v);
    }
    for (int e = 0; e < num_experts; e++) {
        PyObject *v = PyFloat_FromDouble(sums[e]);
        if (!v) goto fail;
        PyTuple_SET_ITEM(s, e, v);
        v = PyLong_FromLong(counts[e]);
        if (!v) goto fail;
        PyTuple_SET_ITEM(c, e, v);
    }
    return Py_BuildValue("(NNN)", cues, s, c);
fail:
    Py_XDECREF(cues);
    Py_XDECREF(s);
    Py_XDECREF(c);
    return NULL;
}

static PyObject *lexicon_len(Lexicon *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSsize_t(self->num_words);
}

static PyMethodDef lexicon_methods[] = {
    {"scan", (PyCFunction)lexicon_scan, METH_O,
     "scan(text: bytes) -> (cue_counts, sums, counts) over the distinct words of text"},
    {"size", (PyCFunction)lexicon_len, METH_NOARGS, "the number of words"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LexiconType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "xpuflow.policy._lexicon.Lexicon",
    .tp_basicsize = sizeof(Lexicon),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Word lookups of the complexity scorer (see the module source).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lexicon_init,
    .tp_dealloc = (destructor)lexicon_dealloc,
    .tp_methods = lexicon_methods,
};

static struct PyModuleDef lexicon_module = {
    PyModuleDef_HEAD_INIT, "_lexicon", "C word lookups for xpuflow's complexity scorer.", -1, NULL,
};

PyMODINIT_FUNC PyInit__lexicon(void) {
    if (PyType_Ready(&LexiconType) < 0) return NULL;
    PyObject *m = PyModule_Create(&lexicon_module);
    if (!m) return NULL;
    Py_INCREF(&LexiconType);
    if (PyModule_AddObject(m, "Lexicon", (PyObject *)&LexiconType) < 0) {
        Py_DECREF(&LexiconType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "MAX_CUES", MAX_CUES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
