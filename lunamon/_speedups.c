/* lunamon._speedups: the line-protocol encoder of lunamon.point, compiled.
 *
 * encode_lines(points) gives exactly the bytes of lunamon.point's pure-Python
 * encode_lines, and encode_line(point) the str of Point.to_line_protocol() (a test
 * compares them on generated points). It takes the common
 * shapes itself -- a 4-tuple point, an exact dict of fields, a TagSet whose line
 * head is cached -- and hands anything else back to the Python code:
 *   - a point that is not a 4-tuple with exact-dict fields: point._encode(point);
 *   - a TagSet's head not cached yet, or tags neither a TagSet nor a dict:
 *     point._point_head();
 *   - a series, tag pair or field key not escaped yet: point._escape_series(),
 *     point._tag_pair(), point._field_key().
 * So escaping rules, caches and errors live in one place, the Python module. Its
 * names are looked up when used, as Python code looks up its globals: TagSet and
 * the caches once per call, the helpers on each (rare) miss.
 *
 * Floats are written as float.__repr__ writes them. A whole number of nanoseconds in
 * seconds (what lunamon's clocks give: execution_time and steps are rounded to the ns)
 * is written from that integer, as repr would write it (ns_seconds); any other float by
 * PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0), the very function float.__repr__
 * calls. The first costs ~30 ns, the second 0.5-1.2 us (its shortest-digits search).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

/* lunamon.point, set by configure(); its names, interned once. */
static PyObject *point_module = NULL;
static PyObject *head_attr = NULL;          /* "_head" */
static PyObject *tagset_name = NULL;        /* "TagSet" */
static PyObject *cache_name = NULL;         /* "_field_key_cache": field key -> escaped + "=" */
static PyObject *field_key_name = NULL;     /* "_field_key"(key) -> str, fills the cache */
static PyObject *point_head_name = NULL;    /* "_point_head"(series, tags) -> str */
static PyObject *encode_name = NULL;        /* "_encode"(point) -> str, any point */
static PyObject *series_cache_name = NULL;  /* "_series_cache": series -> escaped */
static PyObject *escape_series_name = NULL; /* "_escape_series"(series) -> str, fills it */
static PyObject *tag_cache_name = NULL;     /* "_tag_cache": (key, value) -> ",key=value" */
static PyObject *tag_pair_name = NULL;      /* "_tag_pair"(key, value) -> str, fills it */

/* Per call: the module's TagSet and caches as its code sees them (new references). */
typedef struct {
    PyObject *tagset_type;
    PyObject *field_key_cache;
    PyObject *series_cache;
    PyObject *tag_cache;
} Names;

/* point_module.<name>(*args) */
static PyObject *
call_helper(PyObject *name, PyObject *first, PyObject *second)
{
    PyObject *helper = PyObject_GetAttr(point_module, name);
    if (helper == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_CallFunctionObjArgs(helper, first, second, NULL);
    Py_DECREF(helper);
    return result;
}

typedef struct {
    char *data;
    Py_ssize_t size;
    Py_ssize_t capacity;
    int borrowed; /* data is the caller's (on its stack): never freed or reallocated */
} Buffer;

static void
buffer_free(Buffer *buf)
{
    if (!buf->borrowed) {
        PyMem_Free(buf->data);
    }
}

static int
buffer_reserve(Buffer *buf, Py_ssize_t more)
{
    if (more > PY_SSIZE_T_MAX - buf->size) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t need = buf->size + more;
    if (need <= buf->capacity) {
        return 0;
    }
    Py_ssize_t capacity = buf->capacity ? buf->capacity : 4096;
    while (capacity < need) {
        if (capacity > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        capacity *= 2;
    }
    char *data = PyMem_Realloc(buf->borrowed ? NULL : buf->data, (size_t)capacity);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (buf->borrowed) {
        memcpy(data, buf->data, (size_t)buf->size);
        buf->borrowed = 0;
    }
    buf->data = data;
    buf->capacity = capacity;
    return 0;
}

static int
buffer_add(Buffer *buf, const char *text, Py_ssize_t length)
{
    if (buffer_reserve(buf, length) < 0) {
        return -1;
    }
    memcpy(buf->data + buf->size, text, (size_t)length);
    buf->size += length;
    return 0;
}

/* The UTF-8 of a str (cached in the str object by CPython: no copy for ASCII). */
static int
buffer_add_str(Buffer *buf, PyObject *text)
{
    Py_ssize_t length;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &length);
    if (utf8 == NULL) {
        return -1;
    }
    return buffer_add(buf, utf8, length);
}

/* The str ``cache[key]`` if there is one, else what point_module.<helper>(first, second)
 * makes of it (the helper fills the cache). */
static int
add_cached(Buffer *buf, PyObject *cache, PyObject *key, PyObject *helper, PyObject *first,
           PyObject *second)
{
    PyObject *text = PyDict_GetItemWithError(cache, key); /* borrowed */
    if (text != NULL && PyUnicode_Check(text)) {
        return buffer_add_str(buf, text);
    }
    if (PyErr_Occurred()) {
        return -1;
    }
    text = call_helper(helper, first, second);
    if (text == NULL) {
        return -1;
    }
    int result = PyUnicode_Check(text) ? buffer_add_str(buf, text) : -1;
    if (result < 0 && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_TypeError, "a lunamon.point helper did not return a str");
    }
    Py_DECREF(text);
    return result;
}

/* str(value) as f"{value}" writes it: format(value, ""). */
static int
buffer_add_formatted(Buffer *buf, PyObject *value)
{
    PyObject *text = PyObject_Format(value, NULL);
    if (text == NULL) {
        return -1;
    }
    int result = PyUnicode_Check(text) ? buffer_add_str(buf, text) : -1;
    if (result < 0 && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_TypeError, "format() did not return a str");
    }
    Py_DECREF(text);
    return result;
}

/* repr(value) when value is k / 1e9 exactly for a whole k in 1..1e16 (written to text,
 * at least 40 chars; its length), else 0. Every decimal with at most nine places is the
 * shortest text of its double below 4e6 s (two of them are never the same double there: a
 * double's spacing is below 1e-9), so repr gives k's digits with the point nine places
 * from the right, in repr's notation: fixed from 1e-4 on, else d.ddde-XX. */
static int
ns_seconds(char *text, double value)
{
    if (!(value >= 1e-9 && value < 4e6)) { /* a double's spacing is below 1e-9 there */
        return 0;
    }
    long long k = llround(value * 1e9);
    if ((double)k / 1e9 != value) {
        return 0;
    }
    char digits[24];
    int n = snprintf(digits, sizeof digits, "%lld", k);
    int kept = n;
    while (kept > 1 && digits[kept - 1] == '0') {
        kept--;
    }
    int length = 0;
    if (k < 100000) { /* below 1e-4: exponent notation, e.g. 1.2345e-05 */
        text[length++] = digits[0];
        if (kept > 1) {
            text[length++] = '.';
            memcpy(text + length, digits + 1, (size_t)(kept - 1));
            length += kept - 1;
        }
        return length + snprintf(text + length, 16, "e-%02d", 9 - (n - 1));
    }
    if (n <= 9) { /* 0.000ddd */
        memcpy(text, "0.", 2);
        length = 2;
        memset(text + length, '0', (size_t)(9 - n));
        length += 9 - n;
        memcpy(text + length, digits, (size_t)kept);
        return length + kept;
    }
    memcpy(text, digits, (size_t)(n - 9)); /* whole seconds, then the fraction or .0 */
    length = n - 9;
    text[length++] = '.';
    if (kept <= n - 9) {
        text[length++] = '0';
        return length;
    }
    memcpy(text + length, digits + n - 9, (size_t)(kept - (n - 9)));
    return length + kept - (n - 9);
}

static int
buffer_add_float(Buffer *buf, double value)
{
    char fast[48];
    int fast_length = ns_seconds(fast, value);
    if (fast_length > 0) {
        return buffer_add(buf, fast, fast_length);
    }
    char *text = PyOS_double_to_string(value, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL) {
        return -1;
    }
    int result = buffer_add(buf, text, (Py_ssize_t)strlen(text));
    PyMem_Free(text);
    return result;
}

/* A string field: in double quotes, with backslash and quote escaped. */
static int
buffer_add_quoted(Buffer *buf, PyObject *value)
{
    Py_ssize_t length;
    const char *utf8 = PyUnicode_AsUTF8AndSize(value, &length);
    if (utf8 == NULL) {
        return -1;
    }
    /* Worst case every byte escaped, plus the two quotes. */
    if (length > (PY_SSIZE_T_MAX - 2) / 2 || buffer_reserve(buf, 2 * length + 2) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        return -1;
    }
    char *out = buf->data + buf->size;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < length; i++) {
        char c = utf8[i];  /* '\\' and '"' never occur inside a multi-byte sequence */
        if (c == '\\' || c == '"') {
            *out++ = '\\';
        }
        *out++ = c;
    }
    *out++ = '"';
    buf->size = out - buf->data;
    return 0;
}

/* The line head (series and tags): the TagSet's cached one, else from Python. */
static PyObject *
line_head(Names *names, PyObject *series, PyObject *tags)
{
    if ((PyObject *)Py_TYPE(tags) == names->tagset_type) {
        PyObject *cached = PyObject_GetAttr(tags, head_attr);
        if (cached == NULL) {
            return NULL;
        }
        if (PyTuple_CheckExact(cached) && PyTuple_GET_SIZE(cached) == 2) {
            PyObject *cached_series = PyTuple_GET_ITEM(cached, 0);
            int same = cached_series == series;
            if (!same && PyUnicode_CheckExact(cached_series) && PyUnicode_CheckExact(series)) {
                same = PyUnicode_Compare(cached_series, series) == 0;
            }
            if (same) {
                PyObject *head = PyTuple_GET_ITEM(cached, 1);
                Py_INCREF(head);
                Py_DECREF(cached);
                return head;
            }
        }
        Py_DECREF(cached);
    }
    return call_helper(point_head_name, series, tags);
}

static int
add_field_key(Names *names, Buffer *buf, PyObject *key)
{
    return add_cached(buf, names->field_key_cache, key, field_key_name, key, NULL);
}

static int
add_fields(Names *names, Buffer *buf, PyObject *fields)
{
    Py_ssize_t position = 0;
    PyObject *key, *value; /* borrowed */
    int first = 1;
    while (PyDict_Next(fields, &position, &key, &value)) {
        if (!first && buffer_add(buf, ",", 1) < 0) {
            return -1;
        }
        first = 0;
        /* The dict may not change while its items are written: hold them. */
        Py_INCREF(key);
        Py_INCREF(value);
        int result = add_field_key(names, buf, key);
        if (result == 0) {
            PyTypeObject *type = Py_TYPE(value);
            if (type == &PyFloat_Type) {
                result = buffer_add_float(buf, PyFloat_AS_DOUBLE(value));
            }
            else if (type == &PyUnicode_Type) {
                result = buffer_add_quoted(buf, value);
            }
            else if (type == &PyBool_Type) {
                result = value == Py_True ? buffer_add(buf, "true", 4) : buffer_add(buf, "false", 5);
            }
            else {
                result = buffer_add_formatted(buf, value);
                if (result == 0) {
                    result = buffer_add(buf, "i", 1);
                }
            }
        }
        Py_DECREF(key);
        Py_DECREF(value);
        if (result < 0) {
            return -1;
        }
    }
    return 0;
}

static int
add_time(Buffer *buf, PyObject *time_ns)
{
    if (PyLong_CheckExact(time_ns)) {
        int overflow;
        long long value = PyLong_AsLongLongAndOverflow(time_ns, &overflow);
        if (!overflow && !(value == -1 && PyErr_Occurred())) {
            char text[32];
            int length = snprintf(text, sizeof text, "%lld", value);
            return buffer_add(buf, text, length);
        }
        if (PyErr_Occurred()) {
            return -1;
        }
    }
    return buffer_add_formatted(buf, time_ns);
}

/* The head of a point whose tags are a plain dict (no TagSet to keep it): the series
 * and each tag pair from the module's caches, as point._head() writes them. */
static int
add_dict_head(Names *names, Buffer *buf, PyObject *series, PyObject *tags)
{
    if (add_cached(buf, names->series_cache, series, escape_series_name, series, NULL) < 0) {
        return -1;
    }
    Py_ssize_t position = 0;
    PyObject *key, *value; /* borrowed */
    while (PyDict_Next(tags, &position, &key, &value)) {
        PyObject *item = PyTuple_Pack(2, key, value);
        if (item == NULL) {
            return -1;
        }
        int result = add_cached(buf, names->tag_cache, item, tag_pair_name, key, value);
        Py_DECREF(item);
        if (result < 0) {
            return -1;
        }
    }
    return 0;
}

/* One point's line, without its newline. */
static int
add_point(Names *names, Buffer *buf, PyObject *point)
{
    if (!PyTuple_Check(point) || PyTuple_GET_SIZE(point) != 4
        || !PyDict_CheckExact(PyTuple_GET_ITEM(point, 3))) {
        /* Not a shape handled here: the Python encoder says what it makes of it. */
        PyObject *line = call_helper(encode_name, point, NULL);
        if (line == NULL) {
            return -1;
        }
        int result = PyUnicode_Check(line) ? buffer_add_str(buf, line) : -1;
        if (result < 0 && !PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "_encode() did not return a str");
        }
        Py_DECREF(line);
        return result;
    }
    PyObject *series = PyTuple_GET_ITEM(point, 0);
    PyObject *tags = PyTuple_GET_ITEM(point, 2);
    int result;
    if (PyDict_CheckExact(tags)) {
        result = add_dict_head(names, buf, series, tags);
    }
    else {
        PyObject *head = line_head(names, series, tags);
        if (head == NULL) {
            return -1;
        }
        result = PyUnicode_Check(head) ? buffer_add_str(buf, head) : -1;
        if (result < 0 && !PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "_point_head() did not return a str");
        }
        Py_DECREF(head);
    }
    if (result < 0 || buffer_add(buf, " ", 1) < 0) {
        return -1;
    }
    if (add_fields(names, buf, PyTuple_GET_ITEM(point, 3)) < 0 || buffer_add(buf, " ", 1) < 0) {
        return -1;
    }
    return add_time(buf, PyTuple_GET_ITEM(point, 1));
}

static void
names_release(Names *names)
{
    Py_CLEAR(names->tagset_type);
    Py_CLEAR(names->field_key_cache);
    Py_CLEAR(names->series_cache);
    Py_CLEAR(names->tag_cache);
}

/* globals[name], a new reference; AttributeError when missing. */
static PyObject *
global(PyObject *globals, PyObject *name)
{
    PyObject *value = PyDict_GetItemWithError(globals, name); /* borrowed */
    if (value == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_AttributeError, "lunamon.point has no %R", name);
        }
        return NULL;
    }
    Py_INCREF(value);
    return value;
}

/* The module's TagSet and caches, as its code sees them now. */
static int
names_fetch(Names *names)
{
    if (point_module == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "lunamon._speedups.configure() was not called");
        return -1;
    }
    /* The module's globals, read as its own code reads them (Point.to_line_protocol()
     * calls this for every point: a dict lookup each, not a getattr). */
    PyObject *globals = PyModule_GetDict(point_module); /* borrowed */
    if (globals == NULL
        || (names->tagset_type = global(globals, tagset_name)) == NULL
        || (names->field_key_cache = global(globals, cache_name)) == NULL
        || (names->series_cache = global(globals, series_cache_name)) == NULL
        || (names->tag_cache = global(globals, tag_cache_name)) == NULL) {
        names_release(names);
        return -1;
    }
    if (!PyDict_Check(names->field_key_cache) || !PyDict_Check(names->series_cache)
        || !PyDict_Check(names->tag_cache)) {
        PyErr_SetString(PyExc_TypeError, "lunamon.point's encoder caches are not dicts");
        names_release(names);
        return -1;
    }
    return 0;
}

static PyObject *
encode_lines(PyObject *module, PyObject *points)
{
    PyObject *sequence = PySequence_Fast(points, "encode_lines() takes a list of points");
    if (sequence == NULL) {
        return NULL;
    }
    Names names = {NULL, NULL, NULL, NULL};
    if (names_fetch(&names) < 0) {
        Py_DECREF(sequence);
        return NULL;
    }
    Buffer buf = {NULL, 0, 0, 0};
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(sequence); i++) {
        PyObject *point = PySequence_Fast_GET_ITEM(sequence, i);
        Py_INCREF(point); /* a helper's Python code may change the list meanwhile */
        int failed = add_point(&names, &buf, point) < 0 || buffer_add(&buf, "\n", 1) < 0;
        Py_DECREF(point);
        if (failed) {
            goto done;
        }
    }
    result = PyBytes_FromStringAndSize(buf.data ? buf.data : "", buf.size);
done:
    buffer_free(&buf);
    names_release(&names);
    Py_DECREF(sequence);
    return result;
}

/* One point's line as a str, as Point.to_line_protocol() gives it. */
static PyObject *
encode_line(PyObject *module, PyObject *point)
{
    Names names = {NULL, NULL, NULL, NULL};
    if (names_fetch(&names) < 0) {
        return NULL;
    }
    char line[512]; /* most lines fit: no allocation for them */
    Buffer buf = {line, 0, sizeof line, 1};
    PyObject *result = NULL;
    if (add_point(&names, &buf, point) == 0) {
        result = PyUnicode_DecodeUTF8(buf.data, buf.size, "strict");
    }
    buffer_free(&buf);
    names_release(&names);
    return result;
}

static PyObject *
configure(PyObject *module, PyObject *point)
{
    if (!PyModule_Check(point)) {
        PyErr_SetString(PyExc_TypeError, "configure() takes the lunamon.point module");
        return NULL;
    }
    Py_INCREF(point);
    Py_XSETREF(point_module, point);
    Py_RETURN_NONE;
}

/* float_repr(x): the text the encoder writes for float x (repr's, by either path). */
static PyObject *
float_repr(PyObject *self, PyObject *arg)
{
    double value = PyFloat_AsDouble(arg);
    if (value == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    Buffer buf = {NULL, 0, 0, 0};
    if (buffer_add_float(&buf, value) < 0) {
        buffer_free(&buf);
        return NULL;
    }
    PyObject *text = PyUnicode_FromStringAndSize(buf.data, buf.size);
    buffer_free(&buf);
    return text;
}

/* ------------------------------------------------------------------ the recorder's core
 *
 * The per-request work of lunamon._recorder that needs no aiohttp object, compiled:
 * point times (lunamon._ids: a 10 us quantum, then the process's slot), request ids, and
 * the request point itself. lunamon._ids keeps the state that outlives a call (the slot,
 * the id source) and pushes it here (set_slot, set_id_source) at import, at a claim and
 * in a forked child; the pure-Python functions of _ids and _recorder are the reference
 * (tests/test_speedups.py compares them). */

#define QUANTUM_NS 10000LL
static long long last_quantum = 0; /* the last quantum given, for every clock */
static long long point_slot = -1;  /* -1: none claimed (again after a fork) */
static PyObject *claim = NULL;     /* lunamon._ids._claim(): claims and returns the slot */
static char id_prefix[40];
static Py_ssize_t id_prefix_length = 0;
static unsigned long long id_counter = 0;

/* The point time for now (ns): now's quantum (or the next free one), then the slot; -1
 * with an exception set when the slot cannot be claimed. */
static long long
next_point_time(long long now)
{
    long long quantum = now >= 0 ? now / QUANTUM_NS : -((-now + QUANTUM_NS - 1) / QUANTUM_NS);
    if (quantum <= last_quantum) {
        quantum = last_quantum + 1;
    }
    last_quantum = quantum;
    if (point_slot < 0) {
        if (claim == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "lunamon._speedups: configure_ids() first");
            return -1;
        }
        PyObject *slot = PyObject_CallNoArgs(claim);
        if (slot == NULL) {
            return -1;
        }
        long long value = PyLong_AsLongLong(slot);
        Py_DECREF(slot);
        if (value == -1 && PyErr_Occurred()) {
            return -1;
        }
        point_slot = value;
    }
    return quantum * QUANTUM_NS + point_slot;
}

/* point_time(now_ns) -> int: now's quantum (or the next free one), then the slot. */
static PyObject *
point_time(PyObject *self, PyObject *arg)
{
    long long now = PyLong_AsLongLong(arg);
    if (now == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long long time = next_point_time(now);
    return time == -1 && PyErr_Occurred() ? NULL : PyLong_FromLongLong(time);
}

/* set_last_quantum(n): the shared state, set (tests turn the clock back with it). */
static PyObject *
set_last_quantum(PyObject *self, PyObject *arg)
{
    long long value = PyLong_AsLongLong(arg);
    if (value == -1 && PyErr_Occurred()) {
        return NULL;
    }
    last_quantum = value;
    Py_RETURN_NONE;
}

static PyObject *
set_slot(PyObject *self, PyObject *arg)
{
    long long value = PyLong_AsLongLong(arg);
    if (value == -1 && PyErr_Occurred()) {
        return NULL;
    }
    point_slot = value;
    Py_RETURN_NONE;
}

static PyObject *
configure_ids(PyObject *self, PyObject *arg)
{
    if (!PyCallable_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "configure_ids(claim): claim must be callable");
        return NULL;
    }
    Py_INCREF(arg);
    Py_XSETREF(claim, arg);
    Py_RETURN_NONE;
}

/* set_id_source(prefix, counter): ids are "<seconds>,<prefix><counter as 12 hex>". */
static PyObject *
set_id_source(PyObject *self, PyObject *args)
{
    const char *prefix;
    Py_ssize_t length;
    unsigned long long counter;
    if (!PyArg_ParseTuple(args, "s#K", &prefix, &length, &counter)) {
        return NULL;
    }
    if (length >= (Py_ssize_t)sizeof id_prefix) {
        PyErr_SetString(PyExc_ValueError, "id prefix too long");
        return NULL;
    }
    memcpy(id_prefix, prefix, (size_t)length);
    id_prefix_length = length;
    id_counter = counter;
    Py_RETURN_NONE;
}

static PyObject *new_id(long long seconds);

/* request_id(seconds) -> str, as lunamon._ids._request_id writes it. */
static PyObject *
request_id(PyObject *self, PyObject *arg)
{
    long long seconds = PyLong_AsLongLong(arg);
    if (seconds == -1 && PyErr_Occurred()) {
        return NULL;
    }
    return new_id(seconds);
}

static PyObject *
new_id(long long seconds)
{
    char text[96];
    int length = snprintf(text, 32, "%lld,", seconds);
    memcpy(text + length, id_prefix, (size_t)id_prefix_length);
    length += (int)id_prefix_length;
    length += snprintf(text + length, 16, "%012llx", id_counter++ & 0xFFFFFFFFFFFFULL);
    return PyUnicode_FromStringAndSize(text, length);
}

/* ------------------------------------------------------------------ the collector
 *
 * CollectorCore: the fields of lunamon.collector.RequestCollector (which subclasses it
 * and adds the methods), made in one call by begin(), which also reads the clocks, makes
 * or keeps the request id and sets the context variable: the prologue of
 * RequestRecorder.run. lunamon.collector._CollectorFields and lunamon._recorder._py_begin
 * are the pure-Python reference. */

#include <structmember.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    PyObject *route;
    PyObject *request_id;
    PyObject *steps;
    PyObject *extra_tags;   /* NULL reads as None */
    PyObject *extra_fields;
    PyObject *sent_status;
    PyObject *token;
    double started;
    double ended;
    long long start_ns;
} CollectorCore;

static PyMemberDef collector_members[] = {
    {"route", T_OBJECT, offsetof(CollectorCore, route), 0, NULL},
    {"request_id", T_OBJECT, offsetof(CollectorCore, request_id), 0, NULL},
    {"steps", T_OBJECT, offsetof(CollectorCore, steps), 0, NULL},
    {"extra_tags", T_OBJECT, offsetof(CollectorCore, extra_tags), 0, NULL},
    {"extra_fields", T_OBJECT, offsetof(CollectorCore, extra_fields), 0, NULL},
    {"sent_status", T_OBJECT, offsetof(CollectorCore, sent_status), 0, NULL},
    {"_token", T_OBJECT, offsetof(CollectorCore, token), 0, NULL},
    {"started", T_DOUBLE, offsetof(CollectorCore, started), 0, NULL},
    {"ended", T_DOUBLE, offsetof(CollectorCore, ended), 0, NULL},
    {"_start_ns", T_LONGLONG, offsetof(CollectorCore, start_ns), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static int
collector_traverse(CollectorCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->route);
    Py_VISIT(self->request_id);
    Py_VISIT(self->steps);
    Py_VISIT(self->extra_tags);
    Py_VISIT(self->extra_fields);
    Py_VISIT(self->sent_status);
    Py_VISIT(self->token);
    /* Not the type: a heap subclass's subtype_traverse visits it (this type is static). */
    return 0;
}

static int
collector_clear(CollectorCore *self)
{
    Py_CLEAR(self->route);
    Py_CLEAR(self->request_id);
    Py_CLEAR(self->steps);
    Py_CLEAR(self->extra_tags);
    Py_CLEAR(self->extra_fields);
    Py_CLEAR(self->sent_status);
    Py_CLEAR(self->token);
    return 0;
}

static void
collector_dealloc(CollectorCore *self)
{
    PyObject_GC_UnTrack(self);
    collector_clear(self);
    /* A heap subclass's subtype_dealloc, which called this, drops its type reference. */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A collector of type `type` for (route, request_id), its other fields empty. */
static CollectorCore *
collector_make(PyTypeObject *type, PyObject *route, PyObject *request_id)
{
    CollectorCore *self = (CollectorCore *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->steps = PyDict_New();
    if (self->steps == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->route = Py_NewRef(route);
    self->request_id = Py_NewRef(request_id);
    return self;
}

static PyObject *
collector_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"route", "request_id", NULL};
    PyObject *route, *request_id;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO", names, &route, &request_id)) {
        return NULL;
    }
    return (PyObject *)collector_make(type, route, request_id);
}

static PyTypeObject CollectorCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lunamon._speedups.CollectorCore",
    .tp_basicsize = sizeof(CollectorCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The fields of a RequestCollector (lunamon.collector), compiled.",
    .tp_traverse = (traverseproc)collector_traverse,
    .tp_clear = (inquiry)collector_clear,
    .tp_dealloc = (destructor)collector_dealloc,
    .tp_members = collector_members,
    .tp_new = collector_new,
};

/* A client's id may be kept: 1-128 printable ASCII characters (_ids.plausible_request_id). */
static int
plausible(PyObject *value)
{
    if (!PyUnicode_Check(value) || !PyUnicode_IS_ASCII(value)) {
        return 0;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(value);
    if (length < 1 || length > 128) {
        return 0;
    }
    const Py_UCS1 *text = PyUnicode_1BYTE_DATA(value);
    for (Py_ssize_t i = 0; i < length; i++) {
        if (text[i] < 0x20 || text[i] > 0x7e) {
            return 0;
        }
    }
    return 1;
}

/* perf_counter(), as time.perf_counter() reads it on Linux: CLOCK_MONOTONIC in seconds. */
static double
perf_counter(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)((long long)now.tv_sec * 1000000000LL + now.tv_nsec) / 1e9;
}

/* begin(collector_type, route, header_value, now_ns, context_var) -> collector
 * A monitored request starts: its point time (from now_ns), its id (the client's when
 * plausible, else a new one from the point time's second), its collector (started now,
 * _start_ns, _token) set in context_var. */
static PyObject *
begin(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "begin() takes 5 arguments");
        return NULL;
    }
    PyObject *type = args[0], *header = args[2], *var = args[4];
    if (!PyType_Check(type) || !PyType_IsSubtype((PyTypeObject *)type, &CollectorCoreType)
        || !PyContextVar_CheckExact(var)) {
        PyErr_SetString(PyExc_TypeError, "begin(): a CollectorCore type and a ContextVar");
        return NULL;
    }
    long long now = PyLong_AsLongLong(args[3]);
    if (now == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long long start_ns = next_point_time(now);
    if (start_ns == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *id;
    if (header != Py_None && plausible(header)) {
        id = Py_NewRef(header);
    }
    else {
        long long seconds = start_ns / 1000000000LL;
        if (start_ns < 0 && start_ns % 1000000000LL) {
            seconds -= 1; /* floor, as Python's // */
        }
        id = new_id(seconds);
        if (id == NULL) {
            return NULL;
        }
    }
    CollectorCore *collector = collector_make((PyTypeObject *)type, args[1], id);
    Py_DECREF(id);
    if (collector == NULL) {
        return NULL;
    }
    collector->start_ns = start_ns;
    collector->token = PyContextVar_Set(var, (PyObject *)collector);
    if (collector->token == NULL) {
        Py_DECREF(collector);
        return NULL;
    }
    collector->started = perf_counter();
    return (PyObject *)collector;
}

static PyObject *str_request_id = NULL;     /* "request_id" */
static PyObject *str_execution_time = NULL; /* "execution_time" */
static PyObject *str_request = NULL;        /* "request" */

/* request_point(point_type, tag_sets, params, match_info, status, start_ns, request_id,
 *               elapsed, steps) -> Point | None
 * A route's `request` point (lunamon._recorder._request_point is the reference): the
 * route's shared tags for (status, *path parameters), the request id, execution_time to
 * the ns and the steps. None when that tag set is not made yet (the caller makes it). */
static PyObject *
request_point(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "request_point() takes 9 arguments");
        return NULL;
    }
    PyObject *point_type = args[0], *tag_sets = args[1], *params = args[2];
    PyObject *match_info = args[3], *status = args[4], *steps = args[8];
    if (!PyType_Check(point_type) || !PyType_IsSubtype((PyTypeObject *)point_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "request_point(): point_type must be a tuple type");
        return NULL;
    }
    if (!PyDict_Check(tag_sets) || !PyTuple_Check(params) || !PyDict_Check(match_info)
        || !PyDict_Check(steps) || !PyFloat_Check(args[7])) {
        Py_RETURN_NONE; /* not the shapes of lunamon's own: the caller's slow path */
    }
    double elapsed = PyFloat_AsDouble(args[7]);
    if (elapsed == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *key;
    Py_ssize_t count = PyTuple_GET_SIZE(params);
    if (count == 0) {
        key = Py_NewRef(status);
    }
    else {
        key = PyTuple_New(count + 1);
        if (key == NULL) {
            return NULL;
        }
        PyTuple_SET_ITEM(key, 0, Py_NewRef(status));
        for (Py_ssize_t i = 0; i < count; i++) {
            PyObject *value = PyDict_GetItemWithError(match_info, PyTuple_GET_ITEM(params, i));
            if (value == NULL) {
                if (PyErr_Occurred()) {
                    Py_DECREF(key);
                    return NULL;
                }
                value = Py_None;
            }
            PyTuple_SET_ITEM(key, i + 1, Py_NewRef(value));
        }
    }
    PyObject *tags = PyDict_GetItemWithError(tag_sets, key); /* borrowed */
    Py_DECREF(key);
    if (tags == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (fabs(elapsed) < 4e6) {
        elapsed = nearbyint(elapsed * 1e9) / 1e9; /* round() to the ns, as the Python does */
    }
    PyObject *fields = PyDict_New();
    if (fields == NULL) {
        return NULL;
    }
    PyObject *seconds = PyFloat_FromDouble(elapsed);
    if (seconds == NULL || PyDict_SetItem(fields, str_request_id, args[6]) < 0
        || PyDict_SetItem(fields, str_execution_time, seconds) < 0
        || (PyDict_GET_SIZE(steps) && PyDict_Update(fields, steps) < 0)) {
        Py_XDECREF(seconds);
        Py_DECREF(fields);
        return NULL;
    }
    Py_DECREF(seconds);
    PyObject *point = ((PyTypeObject *)point_type)->tp_alloc((PyTypeObject *)point_type, 4);
    if (point == NULL) {
        Py_DECREF(fields);
        return NULL;
    }
    PyTuple_SET_ITEM(point, 0, Py_NewRef(str_request));
    PyTuple_SET_ITEM(point, 1, Py_NewRef(args[5]));
    PyTuple_SET_ITEM(point, 2, Py_NewRef(tags));
    PyTuple_SET_ITEM(point, 3, fields);
    /* Never part of a cycle (the tags and fields hold no point): a point waiting for its
     * batch is never walked by the collector, as CPython untracks such a tuple itself
     * once a collection has seen it. */
    PyObject_GC_UnTrack(point);
    return point;
}

static PyMethodDef methods[] = {
    {"point_time", point_time, METH_O,
     "point_time(now_ns) -> int: a point time never given before, ending in the slot."},
    {"set_last_quantum", set_last_quantum, METH_O, "set_last_quantum(n): the last one given."},
    {"set_slot", set_slot, METH_O, "set_slot(n): the process's slot, -1 for none."},
    {"configure_ids", configure_ids, METH_O, "configure_ids(claim): what claims a slot."},
    {"set_id_source", set_id_source, METH_VARARGS,
     "set_id_source(prefix, counter): the random prefix and next counter of request ids."},
    {"request_id", request_id, METH_O, "request_id(seconds) -> str: a new request id."},
    {"begin", (PyCFunction)(void (*)(void))begin, METH_FASTCALL,
     "begin(collector_type, route, header_value, now_ns, context_var) -> collector."},
    {"request_point", (PyCFunction)(void (*)(void))request_point, METH_FASTCALL,
     "request_point(point_type, tag_sets, params, match_info, status, start_ns, request_id,"
     " elapsed, steps) -> Point | None."},
    {"float_repr", float_repr, METH_O,
     "The text the encoder writes for a float: repr()'s (a test compares them)."},
    {"encode_lines", encode_lines, METH_O,
     "encode_lines(points) -> bytes: newline-terminated line protocol, as lunamon.point's."},
    {"encode_line", encode_line, METH_O,
     "encode_line(point) -> str: one line without its newline, as Point.to_line_protocol()."},
    {"configure", configure, METH_O,
     "configure(lunamon.point): the module whose caches and helpers the encoder uses."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "lunamon._speedups",
    .m_doc = "lunamon's line-protocol encoder and recorder core, compiled (used when built).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if ((head_attr = PyUnicode_InternFromString("_head")) == NULL
        || (tagset_name = PyUnicode_InternFromString("TagSet")) == NULL
        || (cache_name = PyUnicode_InternFromString("_field_key_cache")) == NULL
        || (field_key_name = PyUnicode_InternFromString("_field_key")) == NULL
        || (point_head_name = PyUnicode_InternFromString("_point_head")) == NULL
        || (encode_name = PyUnicode_InternFromString("_encode")) == NULL
        || (series_cache_name = PyUnicode_InternFromString("_series_cache")) == NULL
        || (escape_series_name = PyUnicode_InternFromString("_escape_series")) == NULL
        || (tag_cache_name = PyUnicode_InternFromString("_tag_cache")) == NULL
        || (tag_pair_name = PyUnicode_InternFromString("_tag_pair")) == NULL
        || (str_request_id = PyUnicode_InternFromString("request_id")) == NULL
        || (str_execution_time = PyUnicode_InternFromString("execution_time")) == NULL
        || (str_request = PyUnicode_InternFromString("request")) == NULL) {
        return NULL;
    }
    if (PyType_Ready(&CollectorCoreType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&CollectorCoreType);
    if (PyModule_AddObject(module, "CollectorCore", (PyObject *)&CollectorCoreType) < 0) {
        Py_DECREF(&CollectorCoreType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
