/*
 * WorkerSnapshots as columns, and the worker scorer's score over them, in C (policy/snapshot_table.py
 * is the Python face). Every number is computed with the same IEEE operations, in the same order, as
 * the Python code it mirrors (WorkerScorer.score and .filter, WorkerMetrics.utilization), and the
 * extension is built without floating-point contraction, so the results are bit for bit the same:
 * tests/policy/test_snapshot_table.py holds it to that.
 *
 * Table(size)
 * Table.set(row, snapshot, busy=None)  copy a WorkerSnapshot's fields (or a tuple of their values, in
 *                                      declaration order) into a row; busy is None or the owner's
 *                                      WorkerMetrics.busy_state() (the row can then be re-read)
 * Table.reread(now_s, max_age_s, rows) every row older than max_age_s read again at now_s (taken_at_s,
 *                                      utilization_pct, oldest_in_flight_s); returns the rows it could
 *                                      not: their busy window must be pruned by their owner first
 * Table.reread_row(row, now_s, utilization_pct, busy)   the same for one row, with the owner's reading
 * Table.read(row) -> (snapshot, taken_at_s, utilization_pct, oldest_in_flight_s)   the row's state
 * Table.top(rows, now_s, tokens, memory_bytes, top_k, params) -> (rows, scores, weights): the top_k
 *                                      rows that pass the filter (available = snapshot.healthy), best
 *                                      first, their scores and draw weights; None when a score is NaN
 *                                      (the caller then takes the Python path)
 *
 * rows: None (every row) or a tuple of row indices.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define NEUTRAL 0.5

typedef struct {
    PyObject *snapshot; /* the snapshot the row was set from (owned) */
    /* flags: 1 when the field is None */
    char no_free, no_util, no_temp, no_seq, no_oldest, no_sampled;
    char healthy, draining;
    char ema_kind; /* 0: None or <= 0 (the median stands in), 1: > 0 (known), 2: NaN (kept) */
    char rereadable, has_interval, has_busy_since;
    double ema, one_plus_load, waiting, free, util, temp, max_seq, taken, oldest, sampled;
    /* WorkerMetrics' busy window: started_at_s, window_s, busy_sum_s, its oldest interval, busy_since */
    double started, window, busy_sum, begin0, end0, busy_since;
} Row;

typedef struct {
    PyObject_HEAD
    Py_ssize_t size;
    Row *rows;
    double *scratch; /* size * 3: known EMAs, expected times, scores */
    Py_ssize_t *order;
} Table;

static PyObject *s_worker_id, *s_healthy, *s_draining, *s_queue_depth, *s_in_flight, *s_max_batch_size,
    *s_max_in_flight, *s_mean_batch_size, *s_ema_service_ms, *s_ema_latency_ms, *s_free_memory_bytes,
    *s_utilization_pct, *s_temperature_c, *s_max_seq_len, *s_taken_at_s, *s_oldest_in_flight_s,
    *s_latency_sampled_at_s;

static void table_clear_rows(Table *self) {
    if (self->rows == NULL) return;
    for (Py_ssize_t i = 0; i < self->size; i++) Py_CLEAR(self->rows[i].snapshot);
}

static void table_dealloc(Table *self) {
    table_clear_rows(self);
    PyMem_Free(self->rows);
    PyMem_Free(self->scratch);
    PyMem_Free(self->order);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int table_init(Table *self, PyObject *args, PyObject *kwds) {
    Py_ssize_t size;
    static char *kwlist[] = {"size", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n", kwlist, &size)) return -1;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must be >= 0");
        return -1;
    }
    table_clear_rows(self);
    PyMem_Free(self->rows);
    PyMem_Free(self->scratch);
    PyMem_Free(self->order);
    self->size = size;
    self->rows = PyMem_Calloc(size ? size : 1, sizeof(Row));
    self->scratch = PyMem_Calloc(size ? 3 * size : 3, sizeof(double));
    self->order = PyMem_Calloc(size ? size : 1, sizeof(Py_ssize_t));
    if (self->rows == NULL || self->scratch == NULL || self->order == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* WorkerSnapshot's fields in declaration order: Table.set takes a tuple of their values too. */
enum {
    F_WORKER_ID, F_DEPLOYMENT, F_DEVICE, F_HEALTHY, F_DRAINING, F_QUEUE_DEPTH, F_IN_FLIGHT,
    F_MAX_BATCH_SIZE, F_EMA_LATENCY_MS, F_FREE_MEMORY_BYTES, F_UTILIZATION_PCT, F_TEMPERATURE_C,
    F_MAX_SEQ_LEN, F_TAKEN_AT_S, F_TAGS, F_MAX_IN_FLIGHT, F_OLDEST_IN_FLIGHT_S, F_LATENCY_SAMPLED_AT_S,
    F_MEAN_BATCH_SIZE, F_EMA_SERVICE_MS, NUM_FIELDS
};

/* A new reference to a field: by index from a tuple, else by name. */
static PyObject *get_field(PyObject *obj, int index, PyObject *name) {
    if (PyTuple_CheckExact(obj)) {
        PyObject *value = PyTuple_GET_ITEM(obj, index);
        Py_INCREF(value);
        return value;
    }
    return PyObject_GetAttr(obj, name);
}

/* A field that is a number or None: *none = 1 for None. */
static int get_number(PyObject *obj, int index, PyObject *name, double *out, char *none) {
    PyObject *value = get_field(obj, index, name);
    if (value == NULL) return -1;
    if (value == Py_None) {
        *none = 1;
        *out = NAN;
    } else {
        *none = 0;
        *out = PyFloat_AsDouble(value);
        if (*out == -1.0 && PyErr_Occurred()) {
            Py_DECREF(value);
            return -1;
        }
    }
    Py_DECREF(value);
    return 0;
}

static int get_truth(PyObject *obj, int index, PyObject *name, char *out) {
    PyObject *value = get_field(obj, index, name);
    if (value == NULL) return -1;
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    if (truth < 0) return -1;
    *out = (char)truth;
    return 0;
}

static int check_row(Table *self, Py_ssize_t row) {
    if (row < 0 || row >= self->size) {
        PyErr_Format(PyExc_IndexError, "row %zd is not in a table of %zd rows", row, self->size);
        return -1;
    }
    return 0;
}

/* busy: None, or (started_at_s, window_s, busy_sum_s, begin0 | None, end0 | None, busy_since | None) */
static int set_busy(Row *r, PyObject *busy) {
    if (busy == Py_None) {
        r->rereadable = 0;
        return 0;
    }
    double v[6];
    char none[6];
    if (!PyTuple_Check(busy) || PyTuple_GET_SIZE(busy) != 6) {
        PyErr_SetString(PyExc_TypeError, "busy must be None or a tuple of 6 numbers (or None)");
        return -1;
    }
    for (int k = 0; k < 6; k++) {
        PyObject *item = PyTuple_GET_ITEM(busy, k);
        none[k] = item == Py_None;
        v[k] = none[k] ? NAN : PyFloat_AsDouble(item);
        if (!none[k] && v[k] == -1.0 && PyErr_Occurred()) return -1;
    }
    if (none[0] || none[1] || none[2]) {
        PyErr_SetString(PyExc_TypeError, "busy: started_at_s, window_s and busy_sum_s must be numbers");
        return -1;
    }
    r->started = v[0];
    r->window = v[1];
    r->busy_sum = v[2];
    r->has_interval = !none[3] && !none[4];
    r->begin0 = v[3];
    r->end0 = v[4];
    r->has_busy_since = !none[5];
    r->busy_since = v[5];
    r->rereadable = 1;
    return 0;
}

static PyObject *table_set(Table *self, PyObject *args) {
    Py_ssize_t row;
    PyObject *snap, *busy = Py_None;
    if (!PyArg_ParseTuple(args, "nO|O", &row, &snap, &busy)) return NULL;
    if (check_row(self, row) < 0) return NULL;
    Row r;
    memset(&r, 0, sizeof(r));
    double service, latency, queue_depth, in_flight, max_batch, max_in_flight, mean_batch;
    char service_none, latency_none, qd_none, if_none, mb_none, mif_none, mean_none, taken_none;
    if (PyTuple_CheckExact(snap) && PyTuple_GET_SIZE(snap) != NUM_FIELDS) {
        PyErr_Format(PyExc_TypeError, "a snapshot as a tuple has %d fields", NUM_FIELDS);
        return NULL;
    }
    if (get_truth(snap, F_HEALTHY, s_healthy, &r.healthy) < 0 ||
        get_truth(snap, F_DRAINING, s_draining, &r.draining) < 0 ||
        get_number(snap, F_EMA_SERVICE_MS, s_ema_service_ms, &service, &service_none) < 0 ||
        get_number(snap, F_EMA_LATENCY_MS, s_ema_latency_ms, &latency, &latency_none) < 0 ||
        get_number(snap, F_QUEUE_DEPTH, s_queue_depth, &queue_depth, &qd_none) < 0 ||
        get_number(snap, F_IN_FLIGHT, s_in_flight, &in_flight, &if_none) < 0 ||
        get_number(snap, F_MAX_BATCH_SIZE, s_max_batch_size, &max_batch, &mb_none) < 0 ||
        get_number(snap, F_MAX_IN_FLIGHT, s_max_in_flight, &max_in_flight, &mif_none) < 0 ||
        get_number(snap, F_MEAN_BATCH_SIZE, s_mean_batch_size, &mean_batch, &mean_none) < 0 ||
        get_number(snap, F_FREE_MEMORY_BYTES, s_free_memory_bytes, &r.free, &r.no_free) < 0 ||
        get_number(snap, F_UTILIZATION_PCT, s_utilization_pct, &r.util, &r.no_util) < 0 ||
        get_number(snap, F_TEMPERATURE_C, s_temperature_c, &r.temp, &r.no_temp) < 0 ||
        get_number(snap, F_MAX_SEQ_LEN, s_max_seq_len, &r.max_seq, &r.no_seq) < 0 ||
        get_number(snap, F_TAKEN_AT_S, s_taken_at_s, &r.taken, &taken_none) < 0 ||
        get_number(snap, F_OLDEST_IN_FLIGHT_S, s_oldest_in_flight_s, &r.oldest, &r.no_oldest) < 0 ||
        get_number(snap, F_LATENCY_SAMPLED_AT_S, s_latency_sampled_at_s, &r.sampled, &r.no_sampled) < 0)
        return NULL;
    if (qd_none || if_none || mb_none || taken_none) {
        PyErr_SetString(PyExc_TypeError, "queue_depth, in_flight, max_batch_size and taken_at_s must be numbers");
        return NULL;
    }
    /* ema = s.ema_service_ms or s.ema_latency_ms */
    double ema = NAN;
    char ema_none = 1;
    if (!service_none && service != 0.0) {
        ema = service;
        ema_none = 0;
    } else if (!latency_none) {
        ema = latency;
        ema_none = 0;
    }
    r.ema = ema;
    r.ema_kind = (ema_none || ema <= 0.0) ? 0 : (ema > 0.0 ? 1 : 2);
    /* capacity = max_in_flight or max_batch_size, lowered to the batch size achieved */
    int has_mif = !mif_none && max_in_flight != 0.0;
    double capacity = has_mif ? max_in_flight : max_batch;
    if (!mean_none && !has_mif) {
        double achieved = mean_batch > 1.0 ? mean_batch : 1.0;
        if (achieved < capacity) capacity = achieved;
    }
    double outstanding = queue_depth + in_flight;
    double load = (outstanding > 0 ? outstanding : 0.0) / (capacity > 1 ? capacity : 1.0);
    r.one_plus_load = 1.0 + load;
    if (has_mif) { /* the requests beyond its free slots, in slots' turns (see wait_weight) */
        double ahead = outstanding + 1 - max_in_flight;
        r.waiting = (ahead > 0 ? ahead : 0.0) / max_in_flight;
    } else {
        r.waiting = load;
    }
    if (set_busy(&r, busy) < 0) return NULL;
    Py_INCREF(snap);
    r.snapshot = snap;
    Py_XDECREF(self->rows[row].snapshot);
    self->rows[row] = r;
    Py_RETURN_NONE;
}

/* WorkerMetrics.utilization() at now, when no interval of the window has expired; 0 when one has (the
 * owner prunes it: *needs_prune). */
static double utilization(const Row *r, double now, int *needs_prune) {
    double horizon = now - r->window;
    if (r->has_interval && r->end0 < horizon) {
        *needs_prune = 1;
        return 0.0;
    }
    *needs_prune = 0;
    double lived = now - r->started;
    double span = lived < r->window ? lived : r->window; /* min(window_s, now - started) */
    span = span > 1e-9 ? span : 1e-9;                    /* max(1e-9, ...) */
    double start = now - span;
    double busy = r->busy_sum;
    if (r->has_interval) {
        double upto = start < r->end0 ? start : r->end0; /* min(end, start) */
        double cut = upto - r->begin0;
        busy -= cut > 0.0 ? cut : 0.0;
    }
    busy = busy > 0.0 ? busy : 0.0;
    if (r->has_busy_since) busy += now - (start > r->busy_since ? start : r->busy_since);
    double share = busy / span;
    return share < 1.0 ? share : 1.0;
}

static void apply_reread(Row *r, double now, double util_pct) {
    double age = now - r->taken;
    r->taken = now;
    r->util = util_pct;
    r->no_util = 0;
    if (!r->no_oldest) r->oldest = r->oldest + age;
}

/* rows: None or a tuple of ints; returns the count, fills self->order */
static Py_ssize_t parse_rows(Table *self, PyObject *rows) {
    if (rows == Py_None) {
        for (Py_ssize_t i = 0; i < self->size; i++) self->order[i] = i;
        return self->size;
    }
    if (!PyTuple_Check(rows)) {
        PyErr_SetString(PyExc_TypeError, "rows must be None or a tuple of row indices");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(rows);
    if (n > self->size) {
        PyErr_SetString(PyExc_ValueError, "more rows than the table has");
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t i = PyLong_AsSsize_t(PyTuple_GET_ITEM(rows, k));
        if (i == -1 && PyErr_Occurred()) return -1;
        if (check_row(self, i) < 0) return -1;
        self->order[k] = i;
    }
    return n;
}

static PyObject *table_reread(Table *self, PyObject *args) {
    double now, max_age;
    PyObject *rows;
    if (!PyArg_ParseTuple(args, "ddO", &now, &max_age, &rows)) return NULL;
    Py_ssize_t n = parse_rows(self, rows);
    if (n < 0) return NULL;
    PyObject *left = PyList_New(0);
    if (left == NULL) return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        Row *r = &self->rows[self->order[k]];
        if (r->snapshot == NULL || !r->rereadable || now - r->taken <= max_age) continue;
        int needs_prune;
        double share = utilization(r, now, &needs_prune);
        if (needs_prune) {
            PyObject *index = PyLong_FromSsize_t(self->order[k]);
            if (index == NULL || PyList_Append(left, index) < 0) {
                Py_XDECREF(index);
                Py_DECREF(left);
                return NULL;
            }
            Py_DECREF(index);
            continue;
        }
        apply_reread(r, now, share * 100.0);
    }
    return left;
}

static PyObject *table_reread_row(Table *self, PyObject *args) {
    Py_ssize_t row;
    double now, util_pct;
    PyObject *busy;
    if (!PyArg_ParseTuple(args, "nddO", &row, &now, &util_pct, &busy)) return NULL;
    if (check_row(self, row) < 0) return NULL;
    Row *r = &self->rows[row];
    if (set_busy(r, busy) < 0) return NULL;
    apply_reread(r, now, util_pct);
    Py_RETURN_NONE;
}

static PyObject *optional(int none, double value) {
    if (none) Py_RETURN_NONE;
    return PyFloat_FromDouble(value);
}

static PyObject *table_read(Table *self, PyObject *args) {
    Py_ssize_t row;
    if (!PyArg_ParseTuple(args, "n", &row)) return NULL;
    if (check_row(self, row) < 0) return NULL;
    Row *r = &self->rows[row];
    if (r->snapshot == NULL) {
        PyErr_Format(PyExc_LookupError, "row %zd was never set", row);
        return NULL;
    }
    return Py_BuildValue(
        "(ONNN)", r->snapshot, PyFloat_FromDouble(r->taken), optional(r->no_util, r->util),
        optional(r->no_oldest, r->oldest));
}

/* The k-th smallest of values[0..n) (no NaN), rearranging them so that values[0..k) are the smaller
 * ones (Hoare's selection). */
static double select_kth(double *values, Py_ssize_t n, Py_ssize_t k) {
    Py_ssize_t lo = 0, hi = n - 1;
    while (lo < hi) {
        double pivot = values[lo + (hi - lo) / 2];
        Py_ssize_t i = lo, j = hi;
        while (i <= j) {
            while (values[i] < pivot) i++;
            while (values[j] > pivot) j--;
            if (i <= j) {
                double t = values[i];
                values[i] = values[j];
                values[j] = t;
                i++;
                j--;
            }
        }
        if (k <= j) {
            hi = j;
        } else if (k >= i) {
            lo = i;
        } else {
            break; /* values[j+1..i) equal the pivot, k among them */
        }
    }
    return values[k];
}

/* params: (speed, memory, utilization, temperature, affinity, latency_half_life_s,
 *          staleness_half_life_s, throttle_start_c, throttle_limit_c, choice_temperature, wait_weight) */
static PyObject *table_top(Table *self, PyObject *args) {
    PyObject *rows, *tokens_obj, *memory_obj;
    double now;
    Py_ssize_t top_k;
    double w_speed, w_memory, w_util, w_temp, w_affinity, latency_half_life, staleness_half_life,
        throttle_start, limit_c, choice_temperature, wait_weight;
    if (!PyArg_ParseTuple(
            args, "OdOOn(ddddddddddd)", &rows, &now, &tokens_obj, &memory_obj, &top_k, &w_speed, &w_memory,
            &w_util, &w_temp, &w_affinity, &latency_half_life, &staleness_half_life, &throttle_start,
            &limit_c, &choice_temperature, &wait_weight))
        return NULL;
    int has_tokens = tokens_obj != Py_None, has_memory = memory_obj != Py_None;
    double tokens = has_tokens ? PyFloat_AsDouble(tokens_obj) : 0.0;
    double memory = has_memory ? PyFloat_AsDouble(memory_obj) : 0.0;
    if (PyErr_Occurred()) return NULL;
    Py_ssize_t n = parse_rows(self, rows);
    if (n < 0) return NULL;
    /* 1. filter: order[0..m) are the candidates, in the given order */
    Py_ssize_t m = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        Row *r = &self->rows[self->order[k]];
        if (r->snapshot == NULL) {
            PyErr_Format(PyExc_LookupError, "row %zd was never set", self->order[k]);
            return NULL;
        }
        if (r->healthy && !r->draining && (!has_tokens || r->no_seq || tokens <= r->max_seq) &&
            (!has_memory || r->no_free || memory <= r->free))
            self->order[m++] = self->order[k];
    }
    if (m == 0) return Py_BuildValue("([][][])");
    double *known = self->scratch, *expected = self->scratch + self->size, *scores = expected + self->size;
    /* 2. score: the median EMA, then each candidate's expected time */
    Py_ssize_t num_known = 0;
    for (Py_ssize_t k = 0; k < m; k++) {
        Row *r = &self->rows[self->order[k]];
        if (r->ema_kind == 1) known[num_known++] = r->ema;
    }
    double prior = 1.0;
    if (num_known) {
        /* the median of sorted(known): the middle value, or the mean of the two middle ones */
        Py_ssize_t mid = num_known / 2;
        double upper = select_kth(known, num_known, mid);
        if (num_known % 2) {
            prior = upper;
        } else {
            double lower = known[0]; /* the largest of known[0..mid), all <= upper */
            for (Py_ssize_t k = 1; k < mid; k++)
                if (known[k] > lower) lower = known[k];
            prior = (lower + upper) / 2.0;
        }
    }
    int drifts = !(prior <= 0);
    for (Py_ssize_t k = 0; k < m; k++) {
        Row *r = &self->rows[self->order[k]];
        double ema = r->ema;
        if (r->ema_kind == 0) {
            ema = prior;
        } else if (drifts && ema > prior && !r->no_sampled) {
            double since = now - r->sampled;
            double weight = pow(2.0, -(since > 0.0 ? since : 0.0) / latency_half_life);
            ema = prior * pow(ema / prior, weight);
        }
        if (!r->no_oldest) {
            double later = now - r->taken;
            double stuck = (r->oldest + (later > 0.0 ? later : 0.0)) * 1000.0;
            if (stuck > ema) ema = stuck;
        }
        expected[k] = wait_weight != 0.0 ? ema * r->one_plus_load + wait_weight * (ema * r->waiting)
                                         : ema * r->one_plus_load;
    }
    double best = expected[0];
    for (Py_ssize_t k = 1; k < m; k++)
        if (expected[k] < best) best = expected[k];
    int any_free = 0;
    double max_free = 0.0;
    for (Py_ssize_t k = 0; k < m; k++) {
        Row *r = &self->rows[self->order[k]];
        if (r->no_free) continue;
        if (!any_free || r->free > max_free) max_free = r->free;
        any_free = 1;
    }
    double state_weight = w_speed + w_memory + w_util + w_temp;
    double span_c = limit_c - throttle_start;
    for (Py_ssize_t k = 0; k < m; k++) {
        Row *r = &self->rows[self->order[k]];
        double age = now - r->taken;
        double fresh = age > 0.0 ? pow(2.0, -age / staleness_half_life) : 1.0;
        double speed = expected[k] > 0 ? best / expected[k] : 1.0;
        double memory_term, utilization_term, temperature_term;
        if (r->no_free) {
            memory_term = NEUTRAL;
        } else if (max_free > 0) {
            memory_term = r->free / max_free;
            memory_term = memory_term < 0.0 ? 0.0 : memory_term > 1.0 ? 1.0 : memory_term;
        } else {
            memory_term = 0.0;
        }
        if (r->no_util) {
            utilization_term = NEUTRAL;
        } else {
            double u = r->util / 100.0;
            utilization_term = 1.0 - (u < 0.0 ? 0.0 : u > 1.0 ? 1.0 : u);
        }
        if (r->no_temp) {
            temperature_term = NEUTRAL;
        } else {
            double t = (limit_c - r->temp) / span_c;
            temperature_term = t < 0.0 ? 0.0 : t > 1.0 ? 1.0 : t;
        }
        if (fresh < 1.0) {
            double stale = (1.0 - fresh) * NEUTRAL;
            speed = fresh * speed + stale;
            memory_term = fresh * memory_term + stale;
            utilization_term = fresh * utilization_term + stale;
            temperature_term = fresh * temperature_term + stale;
        }
        double state = (w_speed * speed + w_memory * memory_term + w_util * utilization_term +
                        w_temp * temperature_term) /
                       state_weight;
        double score = state + w_affinity * 0.0;
        if (isnan(score)) Py_RETURN_NONE; /* Python's sort orders NaN its own way: let it */
        scores[k] = score;
    }
    /* 3. the top_k, best first; ties keep the input order (a stable sort on -score); and their draw
     * weights, WorkerScorer.selection_weights: exp((score - best) / choice_temperature) */
    if (top_k > m) top_k = m;
    if (top_k < 0) top_k = 0;
    PyObject *out_rows = PyList_New(top_k), *out_scores = PyList_New(top_k), *out_weights = PyList_New(top_k);
    if (out_rows == NULL || out_scores == NULL || out_weights == NULL) goto fail;
    double best_score = 0.0;
    for (Py_ssize_t j = 0; j < top_k; j++) {
        Py_ssize_t pick = -1;
        for (Py_ssize_t k = 0; k < m; k++) {
            if (self->order[k] < 0) continue;
            if (pick < 0 || scores[k] > scores[pick]) pick = k;
        }
        double score = scores[pick];
        if (j == 0) best_score = score;
        double weight = choice_temperature == 0 ? (score >= best_score ? 1.0 : 0.0)
                                                : exp((score - best_score) / choice_temperature);
        PyObject *row = PyLong_FromSsize_t(self->order[pick]);
        PyObject *score_obj = PyFloat_FromDouble(score);
        PyObject *weight_obj = PyFloat_FromDouble(weight);
        if (row == NULL || score_obj == NULL || weight_obj == NULL) {
            Py_XDECREF(row);
            Py_XDECREF(score_obj);
            Py_XDECREF(weight_obj);
            goto fail;
        }
        PyList_SET_ITEM(out_rows, j, row);
        PyList_SET_ITEM(out_scores, j, score_obj);
        PyList_SET_ITEM(out_weights, j, weight_obj);
        self->order[pick] = -1 - self->order[pick]; /* taken */
    }
    return Py_BuildValue("(NNN)", out_rows, out_scores, out_weights);
fail:
    Py_XDECREF(out_rows);
    Py_XDECREF(out_scores);
    Py_XDECREF(out_weights);
    return NULL;
}

static PyObject *table_size(Table *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSsize_t(self->size);
}

static PyMethodDef table_methods[] = {
    {"set", (PyCFunction)table_set, METH_VARARGS, "set(row, snapshot, busy=None): copy a snapshot into a row"},
    {"reread", (PyCFunction)table_reread, METH_VARARGS,
     "reread(now_s, max_age_s, rows) -> rows whose busy window needs pruning first"},
    {"reread_row", (PyCFunction)table_reread_row, METH_VARARGS,
     "reread_row(row, now_s, utilization_pct, busy): re-read one row with its owner's reading"},
    {"read", (PyCFunction)table_read, METH_VARARGS,
     "read(row) -> (snapshot, taken_at_s, utilization_pct, oldest_in_flight_s)"},
    {"top", (PyCFunction)table_top, METH_VARARGS,
     "top(rows, now_s, tokens, memory_bytes, top_k, params) -> (rows, scores, weights) or None"},
    {"size", (PyCFunction)table_size, METH_NOARGS, "the number of rows"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "xpuflow.policy._snapshot_table.Table",
    .tp_basicsize = sizeof(Table),
    .tp_dealloc = (destructor)table_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "WorkerSnapshots as columns and the worker scorer's score over them (see the module)",
    .tp_methods = table_methods,
    .tp_init = (initproc)table_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_snapshot_table", "WorkerSnapshots as columns, scored in C.", -1, NULL,
};

#define INTERN(var, text)                                     \
    do {                                                      \
        var = PyUnicode_InternFromString(text);               \
        if (var == NULL) return NULL;                         \
    } while (0)

PyMODINIT_FUNC PyInit__snapshot_table(void) {
    INTERN(s_worker_id, "worker_id");
    INTERN(s_healthy, "healthy");
    INTERN(s_draining, "draining");
    INTERN(s_queue_depth, "queue_depth");
    INTERN(s_in_flight, "in_flight");
    INTERN(s_max_batch_size, "max_batch_size");
    INTERN(s_max_in_flight, "max_in_flight");
    INTERN(s_mean_batch_size, "mean_batch_size");
    INTERN(s_ema_service_ms, "ema_service_ms");
    INTERN(s_ema_latency_ms, "ema_latency_ms");
    INTERN(s_free_memory_bytes, "free_memory_bytes");
    INTERN(s_utilization_pct, "utilization_pct");
    INTERN(s_temperature_c, "temperature_c");
    INTERN(s_max_seq_len, "max_seq_len");
    INTERN(s_taken_at_s, "taken_at_s");
    INTERN(s_oldest_in_flight_s, "oldest_in_flight_s");
    INTERN(s_latency_sampled_at_s, "latency_sampled_at_s");
    if (PyType_Ready(&TableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
