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

/* Decimal and hexadecimal digits written by hand: snprintf parses its format on every
 * call, and was a tenth of the compiled code's time per request. */
static int
write_unsigned(char *out, unsigned long long value)
{
    char reversed[24];
    int n = 0;
    do {
        reversed[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    for (int i = 0; i < n; i++) {
        out[i] = reversed[n - 1 - i];
    }
    return n;
}

static int
write_signed(char *out, long long value)
{
    if (value < 0) {
        out[0] = '-';
        return 1 + write_unsigned(out + 1, 0ULL - (unsigned long long)value);
    }
    return write_unsigned(out, (unsigned long long)value);
}

/* value's lowest `width` hex digits, zero-padded, lower case */
static void
write_hex(char *out, unsigned long long value, int width)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = width - 1; i >= 0; i--) {
        out[i] = hex[value & 0xF];
        value >>= 4;
    }
}

/* An ASCII str of text[:length], without the UTF-8 decoder */
static PyObject *
ascii_str(const char *text, Py_ssize_t length)
{
    PyObject *result = PyUnicode_New(length, 127);
    if (result != NULL) {
        memcpy(PyUnicode_1BYTE_DATA(result), text, (size_t)length);
    }
    return result;
}

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
    int n = write_unsigned(digits, (unsigned long long)k);
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
        int exponent = 9 - (n - 1); /* 5..9 */
        memcpy(text + length, "e-0", 3);
        text[length + 3] = (char)('0' + exponent);
        return length + 4;
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
            int length = write_signed(text, value);
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
    for (Py_ssize_t i = 0; i < length; i++) {
        if ((unsigned char)prefix[i] > 127) {
            PyErr_SetString(PyExc_ValueError, "id prefix must be ASCII");
            return NULL;
        }
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
    int length = write_signed(text, seconds);
    text[length++] = ',';
    memcpy(text + length, id_prefix, (size_t)id_prefix_length);
    length += (int)id_prefix_length;
    write_hex(text + length, id_counter++, 12);
    return ascii_str(text, length + 12);
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
static CollectorCore *
begin_core(PyObject *type, PyObject *route, PyObject *header, long long now, PyObject *var)
{
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
    CollectorCore *collector = collector_make((PyTypeObject *)type, route, id);
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
    return collector;
}

static PyObject *
begin(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "begin() takes 5 arguments");
        return NULL;
    }
    PyObject *type = args[0], *var = args[4];
    if (!PyType_Check(type) || !PyType_IsSubtype((PyTypeObject *)type, &CollectorCoreType)
        || !PyContextVar_CheckExact(var)) {
        PyErr_SetString(PyExc_TypeError, "begin(): a CollectorCore type and a ContextVar");
        return NULL;
    }
    long long now = PyLong_AsLongLong(args[3]);
    if (now == -1 && PyErr_Occurred()) {
        return NULL;
    }
    return (PyObject *)begin_core(type, args[1], args[2], now, var);
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
make_request_point(PyObject *point_type, PyObject *tag_sets, PyObject *params,
                   PyObject *match_info, PyObject *status, PyObject *start_ns,
                   PyObject *request_id, double elapsed, PyObject *steps)
{
    if (!PyDict_Check(tag_sets) || !PyTuple_Check(params) || !PyDict_Check(match_info)
        || !PyDict_Check(steps)) {
        Py_RETURN_NONE; /* not the shapes of lunamon's own: the caller's slow path */
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
    if (seconds == NULL || PyDict_SetItem(fields, str_request_id, request_id) < 0
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
    PyTuple_SET_ITEM(point, 1, Py_NewRef(start_ns));
    PyTuple_SET_ITEM(point, 2, Py_NewRef(tags));
    PyTuple_SET_ITEM(point, 3, fields);
    /* Never part of a cycle (the tags and fields hold no point): a point waiting for its
     * batch is never walked by the collector, as CPython untracks such a tuple itself
     * once a collection has seen it. */
    PyObject_GC_UnTrack(point);
    return point;
}

static PyObject *
request_point(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "request_point() takes 9 arguments");
        return NULL;
    }
    PyObject *point_type = args[0];
    if (!PyType_Check(point_type) || !PyType_IsSubtype((PyTypeObject *)point_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "request_point(): point_type must be a tuple type");
        return NULL;
    }
    if (!PyFloat_Check(args[7])) {
        Py_RETURN_NONE;
    }
    return make_request_point(point_type, args[1], args[2], args[3], args[4], args[5], args[6],
                              PyFloat_AS_DOUBLE(args[7]), args[8]);
}

/* ------------------------------------------------------------------ the runner
 *
 * Runner: RequestRecorder.run compiled, the middleware setup() installs (and what
 * @monitor_request calls). lunamon._recorder.RequestRecorder.run is the reference: the
 * prologue (route, begin), then the handler awaited inside a Monitored, an awaitable that
 * passes every step of the handler's coroutine through and, once it has returned a plain
 * web.Response, does the common end itself: the status, the echoed id, the context
 * variable reset, the point emitted. Every other outcome (an exception, a stream, a file,
 * Server-Timing, extra tags, a failed status...) goes to RequestRecorder._end, the
 * reference's own code, so that the two cannot drift apart there. No Python frame of
 * lunamon's runs for a common request. */

static PyObject *str_method, *str_match_info, *str_route, *str_resource, *str_excluded;
static PyObject *str_name, *str_tag_sets, *str_params, *str_headers, *str_get;
static PyObject *str_prepared, *str_status, *str_emit, *str_throw, *str_close, *str_time_ns;
static PyObject *str_value, *str_handler;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *routes;         /* recorder._routes */
    PyObject *route_of;       /* recorder._route(method, resource) */
    PyObject *end;            /* recorder._end(request, route, collector, response, error) */
    PyObject *record;         /* recorder._record(...) */
    PyObject *record_failed;  /* recorder._record_failed(exc) */
    PyObject *monitoring;     /* its emit is read per point (the spool wraps it) */
    PyObject *header;         /* the request-id header (an istr) */
    PyObject *failed;         /* failed_status_codes */
    PyObject *collector_type;
    PyObject *current;        /* lunamon.collector.current */
    PyObject *finished;       /* lunamon._recorder._finished */
    PyObject *expect;         /* istr("Expect") */
    PyObject *response_type;  /* aiohttp.web.Response */
    PyObject *point_type;
    PyObject *time_module;    /* time.time_ns read per request, as the reference does */
    int server_timing;
} Runner;

typedef struct {
    PyObject_HEAD
    Runner *runner;
    PyObject *request;
    PyObject *match_info;
    PyObject *route;
    CollectorCore *collector; /* NULL when the request is not monitored here (passthrough) */
    PyObject *handler;        /* until the first step, which runs the prologue */
    PyObject *inner;          /* the handler's awaitable, while it runs */
} Monitored;

static PyTypeObject MonitoredType;

static int
runner_traverse(Runner *self, visitproc visit, void *arg)
{
    Py_VISIT(self->routes);
    Py_VISIT(self->route_of);
    Py_VISIT(self->end);
    Py_VISIT(self->record);
    Py_VISIT(self->record_failed);
    Py_VISIT(self->monitoring);
    Py_VISIT(self->header);
    Py_VISIT(self->failed);
    Py_VISIT(self->collector_type);
    Py_VISIT(self->current);
    Py_VISIT(self->finished);
    Py_VISIT(self->expect);
    Py_VISIT(self->response_type);
    Py_VISIT(self->point_type);
    Py_VISIT(self->time_module);
    return 0;
}

static int
runner_clear(Runner *self)
{
    Py_CLEAR(self->routes);
    Py_CLEAR(self->route_of);
    Py_CLEAR(self->end);
    Py_CLEAR(self->record);
    Py_CLEAR(self->record_failed);
    Py_CLEAR(self->monitoring);
    Py_CLEAR(self->header);
    Py_CLEAR(self->failed);
    Py_CLEAR(self->collector_type);
    Py_CLEAR(self->current);
    Py_CLEAR(self->finished);
    Py_CLEAR(self->expect);
    Py_CLEAR(self->response_type);
    Py_CLEAR(self->point_type);
    Py_CLEAR(self->time_module);
    return 0;
}

static void
runner_dealloc(Runner *self)
{
    PyObject_GC_UnTrack(self);
    runner_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *runner_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames);

/* Runner(recorder, collector_type, current, finished, expect, response_type, point_type,
 *        time_module): the recorder's settings are read once, here. */
static PyObject *
runner_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *recorder, *collector_type, *current, *finished, *expect, *response_type;
    PyObject *point_type, *time_module;
    if (!PyArg_ParseTuple(args, "OOOOOOOO:Runner", &recorder, &collector_type, &current,
                          &finished, &expect, &response_type, &point_type, &time_module)) {
        return NULL;
    }
    if (!PyType_Check(collector_type)
        || !PyType_IsSubtype((PyTypeObject *)collector_type, &CollectorCoreType)
        || !PyContextVar_CheckExact(current) || !PyContextVar_CheckExact(finished)
        || !PyType_Check(response_type) || !PyType_Check(point_type)
        || !PyType_IsSubtype((PyTypeObject *)point_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError,
                        "Runner(): a CollectorCore type, two ContextVars, two types");
        return NULL;
    }
    Runner *self = (Runner *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = runner_vectorcall;
    PyObject *server_timing = NULL;
    if ((self->routes = PyObject_GetAttrString(recorder, "_routes")) == NULL
        || (self->route_of = PyObject_GetAttrString(recorder, "_route")) == NULL
        || (self->end = PyObject_GetAttrString(recorder, "_end")) == NULL
        || (self->record = PyObject_GetAttrString(recorder, "_record")) == NULL
        || (self->record_failed = PyObject_GetAttrString(recorder, "_record_failed")) == NULL
        || (self->monitoring = PyObject_GetAttrString(recorder, "monitoring")) == NULL
        || (self->header = PyObject_GetAttrString(recorder, "request_id_header")) == NULL
        || (self->failed = PyObject_GetAttrString(recorder, "failed_status_codes")) == NULL
        || (server_timing = PyObject_GetAttrString(recorder, "server_timing")) == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    if (!PyDict_CheckExact(self->routes)) {
        PyErr_SetString(PyExc_TypeError, "Runner(): the recorder's routes must be a dict");
        Py_DECREF(server_timing);
        Py_DECREF(self);
        return NULL;
    }
    self->server_timing = PyObject_IsTrue(server_timing);
    Py_DECREF(server_timing);
    if (self->server_timing < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->collector_type = Py_NewRef(collector_type);
    self->current = Py_NewRef(current);
    self->finished = Py_NewRef(finished);
    self->expect = Py_NewRef(expect);
    self->response_type = Py_NewRef(response_type);
    self->point_type = Py_NewRef(point_type);
    self->time_module = Py_NewRef(time_module);
    return (PyObject *)self;
}

/* The exception being raised, normalized, with its traceback; the error indicator cleared. */
static PyObject *
fetch_exception(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value; /* never NULL: called with an exception set */
}

/* The handler raised (the exception is set): RequestRecorder._end raises it again. */
static PyObject *
monitored_raised(Monitored *self)
{
    Py_CLEAR(self->inner);
    PyObject *error = fetch_exception();
    PyObject *args[5] = {self->request, self->route, (PyObject *)self->collector, Py_None, error};
    PyObject *result = PyObject_Vectorcall(self->runner->end, args, 5, NULL);
    Py_DECREF(error);
    return result;
}

/* The point of a common request, or its record by RequestRecorder._record: 0, or -1 with an
 * exception set that is not an Exception (those are logged, as the reference does). */
static int
monitored_record(Monitored *self, PyObject *response, PyObject *status, double elapsed)
{
    Runner *runner = self->runner;
    CollectorCore *collector = self->collector;
    PyObject *start_ns = PyLong_FromLongLong(collector->start_ns);
    if (start_ns == NULL) {
        goto failed;
    }
    int plain = 1;
    if (collector->extra_tags != NULL && (plain = !PyObject_IsTrue(collector->extra_tags)) < 0) {
        goto failed_ns;
    }
    if (plain && collector->extra_fields != NULL
        && (plain = !PyObject_IsTrue(collector->extra_fields)) < 0) {
        goto failed_ns;
    }
    if (plain) {
        int failed = PySequence_Contains(runner->failed, status);
        if (failed < 0) {
            goto failed_ns;
        }
        plain = !failed;
    }
    PyObject *point = NULL;
    if (plain) {
        PyObject *tag_sets = PyObject_GetAttr(self->route, str_tag_sets);
        PyObject *params = tag_sets ? PyObject_GetAttr(self->route, str_params) : NULL;
        if (params != NULL) {
            point = make_request_point(runner->point_type, tag_sets, params, self->match_info,
                                       status, start_ns, collector->request_id, elapsed,
                                       collector->steps);
        }
        Py_XDECREF(tag_sets);
        Py_XDECREF(params);
        if (point == NULL) {
            goto failed_ns;
        }
        if (point == Py_None) {
            Py_CLEAR(point);
        }
    }
    PyObject *result;
    if (point != NULL) {
        PyObject *emit = PyObject_GetAttr(runner->monitoring, str_emit);
        result = emit ? PyObject_CallOneArg(emit, point) : NULL;
        Py_XDECREF(emit);
        Py_DECREF(point);
    }
    else {
        PyObject *seconds = PyFloat_FromDouble(elapsed);
        if (seconds == NULL) {
            goto failed_ns;
        }
        PyObject *args[8] = {self->request, self->route, (PyObject *)collector, start_ns,
                             seconds, status, response, Py_False};
        result = PyObject_Vectorcall(runner->record, args, 8, NULL);
        Py_DECREF(seconds);
    }
    Py_DECREF(start_ns);
    if (result == NULL) {
        goto failed;
    }
    Py_DECREF(result);
    return 0;
failed_ns:
    Py_DECREF(start_ns);
failed:
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    PyObject *error = fetch_exception();
    result = PyObject_CallOneArg(runner->record_failed, error);
    Py_DECREF(error);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* The handler returned `response` (a new reference, taken): the common end here, any other
 * by RequestRecorder._end. The response, or NULL with an exception set. */
static PyObject *
monitored_returned(Monitored *self, PyObject *response)
{
    Py_CLEAR(self->inner);
    Runner *runner = self->runner;
    CollectorCore *collector = self->collector;
    int common = (PyObject *)Py_TYPE(response) == runner->response_type && !runner->server_timing;
    if (common) {
        PyObject *prepared = PyObject_GetAttr(response, str_prepared);
        if (prepared == NULL) {
            Py_DECREF(response);
            return monitored_raised(self);
        }
        common = prepared == Py_False;
        Py_DECREF(prepared);
    }
    if (!common) {
        PyObject *args[5] = {self->request, self->route, (PyObject *)collector, response, Py_None};
        PyObject *result = PyObject_Vectorcall(runner->end, args, 5, NULL);
        Py_DECREF(response);
        return result;
    }
    PyObject *status = PyObject_GetAttr(response, str_status);
    PyObject *headers = status ? PyObject_GetAttr(response, str_headers) : NULL;
    int echoed = headers ? PyObject_SetItem(headers, runner->header, collector->request_id) : -1;
    Py_XDECREF(headers);
    if (echoed < 0) { /* as if the handler had raised it, as in the reference */
        Py_XDECREF(status);
        Py_DECREF(response);
        return monitored_raised(self);
    }
    double elapsed = (collector->ended ? collector->ended : perf_counter()) - collector->started;
    if (PyContextVar_Reset(runner->current, collector->token) < 0) {
        Py_DECREF(status);
        Py_DECREF(response);
        return NULL;
    }
    PyObject *request_headers = PyObject_GetAttr(self->request, str_headers);
    int expect = request_headers ? PySequence_Contains(request_headers, runner->expect) : -1;
    Py_XDECREF(request_headers);
    if (expect > 0) { /* the prepare hook must know this request was seen */
        PyObject *token = PyContextVar_Set(runner->finished, (PyObject *)collector);
        Py_XDECREF(token);
        expect = token ? 0 : -1;
    }
    if (expect < 0 || monitored_record(self, response, status, elapsed) < 0) {
        Py_DECREF(status);
        Py_DECREF(response);
        return NULL;
    }
    Py_DECREF(status);
    return response;
}

/* One step of the handler's awaitable, seen by the Monitored that awaits it. */
static PySendResult
monitored_outcome(Monitored *self, PySendResult sent, PyObject *result, PyObject **presult)
{
    if (sent == PYGEN_NEXT) {
        *presult = result;
        return PYGEN_NEXT;
    }
    if (self->collector == NULL) { /* not monitored here: the handler's outcome as it is */
        Py_CLEAR(self->inner);
        *presult = result;
        return sent;
    }
    *presult = sent == PYGEN_RETURN ? monitored_returned(self, result) : monitored_raised(self);
    return *presult == NULL ? PYGEN_ERROR : PYGEN_RETURN;
}

static PySendResult monitored_start(Monitored *self, PyObject **presult);

static PySendResult
monitored_am_send(Monitored *self, PyObject *arg, PyObject **presult)
{
    if (self->inner == NULL) {
        if (self->handler == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
            *presult = NULL;
            return PYGEN_ERROR;
        }
        if (arg != Py_None) {
            PyErr_SetString(PyExc_TypeError,
                            "can't send non-None value to a just-started coroutine");
            *presult = NULL;
            return PYGEN_ERROR;
        }
        PySendResult started = monitored_start(self, presult);
        if (started != PYGEN_NEXT) {
            return started;
        }
    }
    PyObject *result;
    PySendResult sent = PyIter_Send(self->inner, arg, &result);
    return monitored_outcome(self, sent, result, presult);
}

/* A finished step as the iterator protocol says it: StopIteration(value). */
static PyObject *
as_iterator_result(PySendResult sent, PyObject *result)
{
    if (sent != PYGEN_RETURN) {
        return result; /* yielded, or NULL with the error set */
    }
    PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, result);
    Py_DECREF(result);
    if (stop != NULL) {
        PyErr_SetObject(PyExc_StopIteration, stop);
        Py_DECREF(stop);
    }
    return NULL;
}

static PyObject *
monitored_send(Monitored *self, PyObject *arg)
{
    PyObject *result;
    PySendResult sent = monitored_am_send(self, arg, &result);
    return as_iterator_result(sent, result);
}

static PyObject *
monitored_iternext(Monitored *self)
{
    return monitored_send(self, Py_None);
}

/* StopIteration's value (the error indicator cleared), or NULL with another error kept. */
static int
fetch_stop_iteration(PyObject **value)
{
    if (!PyErr_ExceptionMatches(PyExc_StopIteration)) {
        return -1;
    }
    PyObject *stop = fetch_exception();
    *value = PyObject_GetAttr(stop, str_value);
    Py_DECREF(stop);
    return *value == NULL ? -1 : 0;
}

/* throw(...): into the handler's awaitable (a task cancelled, say); its outcome is the
 * handler's, as at the reference's await. */
static PyObject *
monitored_throw(Monitored *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw() takes 1 to 3 arguments");
        return NULL;
    }
    if (self->inner == NULL) { /* not started (or done): raised at once, nothing runs */
        Py_CLEAR(self->handler);
        if (PyExceptionInstance_Check(args[0])) {
            PyErr_SetObject((PyObject *)Py_TYPE(args[0]), args[0]);
        }
        else {
            PyErr_SetObject(args[0], nargs > 1 ? args[1] : Py_None);
        }
        return NULL;
    }
    PyObject *method = PyObject_GetAttr(self->inner, str_throw);
    PyObject *result;
    PySendResult sent;
    if (method == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyObject *out;
            sent = monitored_outcome(self, PYGEN_ERROR, NULL, &out);
            return as_iterator_result(sent, out);
        }
        PyErr_Clear(); /* raised at the await itself, as Python does */
        if (PyExceptionInstance_Check(args[0])) {
            PyErr_SetObject((PyObject *)Py_TYPE(args[0]), args[0]);
        }
        else {
            PyErr_SetObject(args[0], nargs > 1 ? args[1] : Py_None);
        }
        PyObject *out;
        sent = monitored_outcome(self, PYGEN_ERROR, NULL, &out);
        return as_iterator_result(sent, out);
    }
    result = PyObject_Vectorcall(method, args, (size_t)nargs, NULL);
    Py_DECREF(method);
    if (result != NULL) {
        sent = PYGEN_NEXT;
    }
    else {
        sent = fetch_stop_iteration(&result) == 0 ? PYGEN_RETURN : PYGEN_ERROR;
    }
    PyObject *out;
    sent = monitored_outcome(self, sent, result, &out);
    return as_iterator_result(sent, out);
}

/* close(): the handler's awaitable closed, then GeneratorExit at the await, as in the
 * reference (whose end records the request as a 500). */
static PyObject *
monitored_close(Monitored *self, PyObject *unused)
{
    Py_CLEAR(self->handler); /* never started: nothing ran, nothing to record */
    if (self->inner == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *method = PyObject_GetAttr(self->inner, str_close);
    PyObject *closed = NULL;
    if (method != NULL) {
        closed = PyObject_CallNoArgs(method);
        Py_DECREF(method);
    }
    else if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        closed = Py_NewRef(Py_None);
    }
    if (closed == NULL) {
        PyObject *result;
        monitored_outcome(self, PYGEN_ERROR, NULL, &result);
        Py_XDECREF(result);
        return NULL;
    }
    Py_DECREF(closed);
    if (self->collector == NULL) {
        Py_CLEAR(self->inner);
        Py_RETURN_NONE;
    }
    PyErr_SetNone(PyExc_GeneratorExit);
    PyObject *result = monitored_raised(self);
    if (result != NULL) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_RuntimeError, "coroutine ignored GeneratorExit");
        return NULL;
    }
    if (PyErr_ExceptionMatches(PyExc_GeneratorExit)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return NULL;
}

static void
monitored_finalize(Monitored *self)
{
    if (self->inner == NULL || self->runner == NULL) {
        return;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *result = monitored_close(self, NULL);
    if (result == NULL) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
    else {
        Py_DECREF(result);
    }
    PyErr_Restore(type, value, traceback);
}

static int
monitored_traverse(Monitored *self, visitproc visit, void *arg)
{
    Py_VISIT(self->runner);
    Py_VISIT(self->request);
    Py_VISIT(self->match_info);
    Py_VISIT(self->route);
    Py_VISIT(self->collector);
    Py_VISIT(self->handler);
    Py_VISIT(self->inner);
    return 0;
}

static int
monitored_clear(Monitored *self)
{
    Py_CLEAR(self->runner);
    Py_CLEAR(self->request);
    Py_CLEAR(self->match_info);
    Py_CLEAR(self->route);
    Py_CLEAR(self->collector);
    Py_CLEAR(self->handler);
    Py_CLEAR(self->inner);
    return 0;
}

static void
monitored_dealloc(Monitored *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* resurrected */
    }
    PyObject_GC_UnTrack(self);
    monitored_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
monitored_await(PyObject *self)
{
    return Py_NewRef(self);
}

static PyAsyncMethods monitored_async = {
    .am_await = monitored_await,
    .am_send = (sendfunc)monitored_am_send,
};

static PyMethodDef monitored_methods[] = {
    {"send", (PyCFunction)monitored_send, METH_O, "send(value): the next step."},
    {"throw", (PyCFunction)(void (*)(void))monitored_throw, METH_FASTCALL,
     "throw(exception): into the handler's awaitable."},
    {"close", (PyCFunction)monitored_close, METH_NOARGS, "close(): as a coroutine's."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MonitoredType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lunamon._speedups.Monitored",
    .tp_basicsize = sizeof(Monitored),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A monitored request's handler, awaited (made by Runner).",
    .tp_traverse = (traverseproc)monitored_traverse,
    .tp_clear = (inquiry)monitored_clear,
    .tp_dealloc = (destructor)monitored_dealloc,
    .tp_finalize = (destructor)monitored_finalize,
    .tp_as_async = &monitored_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)monitored_iternext,
    .tp_methods = monitored_methods,
};

/* The handler's awaitable as an iterator to send to (its __await__), or NULL (set). */
static PyObject *
awaitable_iterator(PyObject *awaitable)
{
    if (PyCoro_CheckExact(awaitable) || PyGen_CheckExact(awaitable)) {
        return awaitable;
    }
    PyAsyncMethods *async = Py_TYPE(awaitable)->tp_as_async;
    PyObject *iterator = NULL;
    if (async == NULL || async->am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                     Py_TYPE(awaitable)->tp_name);
    }
    else if ((iterator = async->am_await(awaitable)) != NULL && !PyIter_Check(iterator)) {
        PyErr_Format(PyExc_TypeError, "__await__() returned non-iterator of type '%.100s'",
                     Py_TYPE(iterator)->tp_name);
        Py_CLEAR(iterator);
    }
    Py_DECREF(awaitable);
    return iterator;
}

/* The first step: the prologue of RequestRecorder.run (route, begin), then the handler
 * called. PYGEN_NEXT when its awaitable is ready to be sent to; else the outcome. */
static PySendResult
monitored_start(Monitored *self, PyObject **presult)
{
    Runner *runner = self->runner;
    PyObject *request = self->request, *handler = self->handler;
    self->handler = NULL; /* ours until the end of this call */
    *presult = NULL;
    PyObject *method = PyObject_GetAttr(request, str_method);
    PyObject *match_info = method ? PyObject_GetAttr(request, str_match_info) : NULL;
    PyObject *matched = match_info ? PyObject_GetAttr(match_info, str_route) : NULL;
    PyObject *resource = matched ? PyObject_GetAttr(matched, str_resource) : NULL;
    Py_XDECREF(matched);
    PyObject *key = resource ? PyTuple_Pack(2, method, resource) : NULL;
    PyObject *route = NULL;
    if (key != NULL) {
        route = PyDict_GetItemWithError(runner->routes, key);
        Py_DECREF(key);
        if (route != NULL) {
            Py_INCREF(route);
        }
        else if (!PyErr_Occurred()) {
            route = PyObject_CallFunctionObjArgs(runner->route_of, method, resource, NULL);
        }
    }
    Py_XDECREF(method);
    Py_XDECREF(resource);
    int skip = -1;
    if (route != NULL) {
        PyObject *value = PyObject_GetAttr(route, str_excluded);
        skip = value ? PyObject_IsTrue(value) : -1;
        Py_XDECREF(value);
        if (skip == 0) { /* monitored already (a handler inside a monitored one) */
            if (PyContextVar_Get(runner->current, NULL, &value) < 0) {
                skip = -1;
            }
            else {
                skip = value != NULL && value != Py_None;
                Py_XDECREF(value);
            }
        }
    }
    if (skip != 0) { /* an error, or the handler's own outcome, passed through */
        Py_XDECREF(route);
        Py_XDECREF(match_info);
        PyObject *awaitable = skip < 0 ? NULL : PyObject_CallOneArg(handler, request);
        Py_DECREF(handler);
        self->inner = awaitable ? awaitable_iterator(awaitable) : NULL;
        return self->inner == NULL ? PYGEN_ERROR : PYGEN_NEXT;
    }
    PyObject *headers = PyObject_GetAttr(request, str_headers);
    PyObject *header = headers ? PyObject_CallMethodOneArg(headers, str_get, runner->header) : NULL;
    Py_XDECREF(headers);
    PyObject *time_ns = header ? PyObject_GetAttr(runner->time_module, str_time_ns) : NULL;
    PyObject *now = time_ns ? PyObject_CallNoArgs(time_ns) : NULL;
    Py_XDECREF(time_ns);
    long long now_ns = now ? PyLong_AsLongLong(now) : -1;
    Py_XDECREF(now);
    PyObject *name = NULL;
    if (!(now_ns == -1 && PyErr_Occurred())) {
        name = PyObject_GetAttr(route, str_name);
    }
    CollectorCore *collector = NULL;
    if (name != NULL) {
        collector = begin_core(runner->collector_type, name, header, now_ns, runner->current);
        Py_DECREF(name);
    }
    Py_XDECREF(header);
    if (collector == NULL) {
        Py_DECREF(route);
        Py_DECREF(match_info);
        Py_DECREF(handler);
        return PYGEN_ERROR;
    }
    self->match_info = match_info;
    self->route = route;
    self->collector = collector;
    PyObject *awaitable = PyObject_CallOneArg(handler, request);
    Py_DECREF(handler);
    self->inner = awaitable ? awaitable_iterator(awaitable) : NULL;
    if (self->inner == NULL) { /* as if raised at the reference's await */
        *presult = monitored_raised(self);
        return *presult == NULL ? PYGEN_ERROR : PYGEN_RETURN;
    }
    return PYGEN_NEXT;
}

/* Runner(request, handler): the awaitable of the response, a Monitored; like a coroutine,
 * it runs nothing until its first step. */
static PyObject *
runner_serve(Runner *runner, PyObject *request, PyObject *handler)
{
    Monitored *self = PyObject_GC_New(Monitored, &MonitoredType);
    if (self == NULL) {
        return NULL;
    }
    self->runner = (Runner *)Py_NewRef(runner);
    self->request = Py_NewRef(request);
    self->match_info = NULL;
    self->route = NULL;
    self->collector = NULL;
    self->handler = Py_NewRef(handler);
    self->inner = NULL;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
runner_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs == 2 && nkw == 0) {
        return runner_serve((Runner *)self, args[0], args[1]);
    }
    if (nargs == 1 && nkw == 1) { /* aiohttp: partial(middleware, handler=handler)(request) */
        PyObject *keyword = PyTuple_GET_ITEM(kwnames, 0);
        if (keyword == str_handler || PyUnicode_Compare(keyword, str_handler) == 0) {
            return runner_serve((Runner *)self, args[0], args[1]);
        }
    }
    PyErr_SetString(PyExc_TypeError, "Runner takes (request, handler)");
    return NULL;
}

static PyObject *
runner_middleware_version(PyObject *self, void *closure)
{
    return PyLong_FromLong(1); /* aiohttp's web.middleware marking: a new-style middleware */
}

static PyGetSetDef runner_getset[] = {
    {"__middleware_version__", runner_middleware_version, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lunamon._speedups.Runner",
    .tp_basicsize = sizeof(Runner),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "RequestRecorder.run, compiled: the middleware, called (request, handler).",
    .tp_traverse = (traverseproc)runner_traverse,
    .tp_clear = (inquiry)runner_clear,
    .tp_dealloc = (destructor)runner_dealloc,
    .tp_vectorcall_offset = offsetof(Runner, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getset = runner_getset,
    .tp_new = runner_new,
};

/* ------------------------------------------------------------------ the prepare hook
 *
 * PrepareGate(hook, current, finished, expect): aiohttp's on_response_prepare receiver.
 * For almost every response there is nothing to do (the middleware has recorded the
 * request and echoed its id already): no collector current or finished, no Expect header.
 * Then it answers a finished awaitable, with no Python frame; otherwise it calls `hook`
 * (RequestRecorder.on_response_prepare, which checks the same first). */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *hook;
    PyObject *current;
    PyObject *finished;
    PyObject *expect;
} PrepareGate;

/* Ready: an awaitable already done (its value None); one, shared. */
static PyObject *
ready_await(PyObject *self)
{
    return Py_NewRef(self);
}

static PySendResult
ready_send(PyObject *self, PyObject *arg, PyObject **presult)
{
    *presult = Py_NewRef(Py_None);
    return PYGEN_RETURN;
}

static PyObject *
ready_next(PyObject *self)
{
    return NULL; /* exhausted: StopIteration, value None */
}

static PyAsyncMethods ready_async = {
    .am_await = ready_await,
    .am_send = ready_send,
};

static void
ready_dealloc(PyObject *self)
{
    PyObject_Free(self);
}

static PyTypeObject ReadyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lunamon._speedups.Ready",
    .tp_basicsize = sizeof(PyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = ready_dealloc,
    .tp_doc = "An awaitable already done.",
    .tp_as_async = &ready_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = ready_next,
};

static PyObject *ready_singleton = NULL; /* made at import */

static int
gate_traverse(PrepareGate *self, visitproc visit, void *arg)
{
    Py_VISIT(self->hook);
    Py_VISIT(self->current);
    Py_VISIT(self->finished);
    Py_VISIT(self->expect);
    return 0;
}

static int
gate_clear(PrepareGate *self)
{
    Py_CLEAR(self->hook);
    Py_CLEAR(self->current);
    Py_CLEAR(self->finished);
    Py_CLEAR(self->expect);
    return 0;
}

static void
gate_dealloc(PrepareGate *self)
{
    PyObject_GC_UnTrack(self);
    gate_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* 1 when context_var holds something other than None, 0 when not, -1 on error. */
static int
holds(PyObject *context_var)
{
    PyObject *value;
    if (PyContextVar_Get(context_var, NULL, &value) < 0) {
        return -1;
    }
    int held = value != NULL && value != Py_None;
    Py_XDECREF(value);
    return held;
}

static PyObject *
gate_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PrepareGate *self = (PrepareGate *)op;
    if (PyVectorcall_NARGS(nargsf) == 2 && kwnames == NULL) {
        int busy = holds(self->current);
        if (busy == 0) {
            busy = holds(self->finished);
        }
        if (busy == 0) {
            PyObject *headers = PyObject_GetAttr(args[0], str_headers);
            busy = headers ? PySequence_Contains(headers, self->expect) : -1;
            Py_XDECREF(headers);
        }
        if (busy < 0) {
            return NULL;
        }
        if (busy == 0) {
            return Py_NewRef(ready_singleton);
        }
    }
    return PyObject_Vectorcall(self->hook, args, nargsf, kwnames);
}

static PyObject *
gate_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *hook, *current, *finished, *expect;
    if (!PyArg_ParseTuple(args, "OOOO:PrepareGate", &hook, &current, &finished, &expect)) {
        return NULL;
    }
    if (!PyCallable_Check(hook) || !PyContextVar_CheckExact(current)
        || !PyContextVar_CheckExact(finished)) {
        PyErr_SetString(PyExc_TypeError, "PrepareGate(): a callable and two ContextVars");
        return NULL;
    }
    PrepareGate *self = (PrepareGate *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = gate_vectorcall;
    self->hook = Py_NewRef(hook);
    self->current = Py_NewRef(current);
    self->finished = Py_NewRef(finished);
    self->expect = Py_NewRef(expect);
    return (PyObject *)self;
}

static PyTypeObject PrepareGateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lunamon._speedups.PrepareGate",
    .tp_basicsize = sizeof(PrepareGate),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "on_response_prepare, compiled where there is nothing to do.",
    .tp_traverse = (traverseproc)gate_traverse,
    .tp_clear = (inquiry)gate_clear,
    .tp_dealloc = (destructor)gate_dealloc,
    .tp_vectorcall_offset = offsetof(PrepareGate, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = gate_new,
};

/* ------------------------------------------------------------------ the flusher's emit
 *
 * ChannelCore: the fields of lunamon.flusher._Channel that emit reads and writes (the
 * channel subclasses it and adds the rest); lunamon.flusher._ChannelFields is the
 * pure-Python twin. Emitter: Flusher.emit compiled for the common point, the one that
 * neither fills a channel's bound nor completes a batch, while no test tap listens and
 * the flusher is open: each channel counts it and appends it to its buffer. Every other
 * point goes to Flusher.emit itself (the reference), which decides as before. */

typedef struct {
    PyObject_HEAD
    PyObject *buffer; /* a collections.deque */
    Py_ssize_t emitted;
    Py_ssize_t packed;
    Py_ssize_t capacity;
    Py_ssize_t wake_at;
    char closed;
} ChannelCore;

static PyMemberDef channel_members[] = {
    {"buffer", T_OBJECT_EX, offsetof(ChannelCore, buffer), 0, NULL},
    {"emitted", T_PYSSIZET, offsetof(ChannelCore, emitted), 0, NULL},
    {"packed", T_PYSSIZET, offsetof(ChannelCore, packed), 0, NULL},
    {"capacity", T_PYSSIZET, offsetof(ChannelCore, capacity), 0, NULL},
    {"wake_at", T_PYSSIZET, offsetof(ChannelCore, wake_at), 0, NULL},
    {"closed", T_BOOL, offsetof(ChannelCore, closed), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static int
channel_traverse(ChannelCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->buffer);
    return 0;
}

static int
channel_clear(ChannelCore *self)
{
    Py_CLEAR(self->buffer);
    return 0;
}

static void
channel_dealloc(ChannelCore *self)
{
    PyObject_GC_UnTrack(self);
    channel_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject ChannelCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lunamon._speedups.ChannelCore",
    .tp_basicsize = sizeof(ChannelCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The fields of a flusher channel that emit uses (lunamon.flusher), compiled.",
    .tp_traverse = (traverseproc)channel_traverse,
    .tp_clear = (inquiry)channel_clear,
    .tp_dealloc = (destructor)channel_dealloc,
    .tp_members = channel_members,
    .tp_new = PyType_GenericNew,
};

static PyObject *str_append;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *channels; /* the flusher's list of channels */
    PyObject *taps;     /* lunamon.flusher._taps */
    PyObject *emit;     /* the flusher's own emit (bound), for every other point */
} Emitter;

static int
emitter_traverse(Emitter *self, visitproc visit, void *arg)
{
    Py_VISIT(self->channels);
    Py_VISIT(self->taps);
    Py_VISIT(self->emit);
    return 0;
}

static int
emitter_clear(Emitter *self)
{
    Py_CLEAR(self->channels);
    Py_CLEAR(self->taps);
    Py_CLEAR(self->emit);
    return 0;
}

static void
emitter_dealloc(Emitter *self)
{
    PyObject_GC_UnTrack(self);
    emitter_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* 1 when every channel takes `point` without a decision (not closed, below its bound and
 * below the point that completes a batch), 0 when the reference must decide, -1 on error. */
static int
emitter_common(Emitter *self)
{
    if (PyList_GET_SIZE(self->taps)) {
        return 0;
    }
    Py_ssize_t count = PyList_GET_SIZE(self->channels);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(self->channels, i);
        if (!PyObject_TypeCheck(item, &ChannelCoreType)) {
            return 0;
        }
        ChannelCore *channel = (ChannelCore *)item;
        if (channel->closed || channel->buffer == NULL) {
            return 0;
        }
        Py_ssize_t size = PyObject_Size(channel->buffer);
        if (size < 0) {
            return -1;
        }
        size += channel->packed;
        if (size >= channel->capacity || size >= channel->wake_at) {
            return 0;
        }
    }
    return 1;
}

static PyObject *
emitter_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Emitter *self = (Emitter *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    int common = nargs == 1 && kwnames == NULL ? emitter_common(self) : 0;
    if (common < 0) {
        return NULL;
    }
    if (!common) {
        return PyObject_Vectorcall(self->emit, args, nargsf, kwnames);
    }
    Py_ssize_t count = PyList_GET_SIZE(self->channels);
    for (Py_ssize_t i = 0; i < count; i++) {
        ChannelCore *channel = (ChannelCore *)PyList_GET_ITEM(self->channels, i);
        channel->emitted++;
        PyObject *done = PyObject_CallMethodOneArg(channel->buffer, str_append, args[0]);
        if (done == NULL) {
            return NULL;
        }
        Py_DECREF(done);
    }
    Py_RETURN_NONE;
}

/* Emitter(channels, taps, emit): channels a list the flusher keeps, taps a list. */
static PyObject *
emitter_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *channels, *taps, *emit;
    if (!PyArg_ParseTuple(args, "O!O!O:Emitter", &PyList_Type, &channels, &PyList_Type, &taps,
                          &emit)) {
        return NULL;
    }
    if (!PyCallable_Check(emit)) {
        PyErr_SetString(PyExc_TypeError, "Emitter(): emit must be callable");
        return NULL;
    }
    Emitter *self = (Emitter *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = emitter_vectorcall;
    self->channels = Py_NewRef(channels);
    self->taps = Py_NewRef(taps);
    self->emit = Py_NewRef(emit);
    return (PyObject *)self;
}

static PyTypeObject EmitterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lunamon._speedups.Emitter",
    .tp_basicsize = sizeof(Emitter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Flusher.emit, compiled for the point that needs no decision.",
    .tp_traverse = (traverseproc)emitter_traverse,
    .tp_clear = (inquiry)emitter_clear,
    .tp_dealloc = (destructor)emitter_dealloc,
    .tp_vectorcall_offset = offsetof(Emitter, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = emitter_new,
};

/* ------------------------------------------------------------------ @monitor_request
 *
 * MonitoredHandler: what @monitor_request returns when the extension is built.
 * lunamon.aiohttp._monitored's coroutine function is the reference and does everything
 * but one call: handler(request) with the request of the app it last served, which calls
 * that app's middleware (a Runner) directly and returns its awaitable, with no coroutine
 * of lunamon's between aiohttp and the runner. The runner itself passes a request that is
 * monitored already (or excluded) through, as the reference's check does. The app and its
 * middleware are the reference's own cache (`last`, a list of two it fills), so the two
 * cannot disagree on which recorder serves an app. inspect sees a coroutine function, as
 * it does a Cython function: __code__ is the reference's (CO_COROUTINE), and __get__ binds
 * it to a web.View as a function is bound. */

static PyObject *str_app;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *func;         /* the handler */
    PyObject *reference;    /* the Python wrapper, for every other call */
    PyObject *last;         /* [app, its recorder's middleware], filled by the reference */
    PyObject *request_type; /* aiohttp.web.Request */
    PyObject *dict;         /* __name__, __doc__, __wrapped__... (functools.wraps) */
    PyObject *weakreflist;
} MonitoredHandler;

static int
handler_traverse(MonitoredHandler *self, visitproc visit, void *arg)
{
    Py_VISIT(self->func);
    Py_VISIT(self->reference);
    Py_VISIT(self->last);
    Py_VISIT(self->request_type);
    Py_VISIT(self->dict);
    return 0;
}

static int
handler_clear(MonitoredHandler *self)
{
    Py_CLEAR(self->func);
    Py_CLEAR(self->reference);
    Py_CLEAR(self->last);
    Py_CLEAR(self->request_type);
    Py_CLEAR(self->dict);
    return 0;
}

static void
handler_dealloc(MonitoredHandler *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    handler_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
handler_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    MonitoredHandler *self = (MonitoredHandler *)op;
    if (PyVectorcall_NARGS(nargsf) == 1 && (kwnames == NULL || PyTuple_GET_SIZE(kwnames) == 0)
        && Py_IS_TYPE(args[0], (PyTypeObject *)self->request_type)
        && PyList_GET_SIZE(self->last) == 2 && PyList_GET_ITEM(self->last, 1) != Py_None) {
        PyObject *app = PyObject_GetAttr(args[0], str_app);
        if (app == NULL) {
            return NULL;
        }
        int same = app == PyList_GET_ITEM(self->last, 0);
        Py_DECREF(app);
        if (same) {
            PyObject *middleware = Py_NewRef(PyList_GET_ITEM(self->last, 1));
            PyObject *call_args[2] = {args[0], self->func};
            PyObject *result = PyObject_Vectorcall(middleware, call_args, 2, NULL);
            Py_DECREF(middleware);
            return result;
        }
    }
    return PyObject_Vectorcall(self->reference, args, nargsf, kwnames);
}

/* MonitoredHandler(func, reference, last, request_type) */
static PyObject *
handler_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *func, *reference, *last, *request_type;
    if (!PyArg_ParseTuple(args, "OOO!O!:MonitoredHandler", &func, &reference, &PyList_Type, &last,
                          &PyType_Type, &request_type)) {
        return NULL;
    }
    if (!PyCallable_Check(func) || !PyCallable_Check(reference)) {
        PyErr_SetString(PyExc_TypeError, "MonitoredHandler(): func and reference must be callable");
        return NULL;
    }
    if (PyList_GET_SIZE(last) != 2) {
        PyErr_SetString(PyExc_ValueError, "MonitoredHandler(): last must be a list of two");
        return NULL;
    }
    MonitoredHandler *self = (MonitoredHandler *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = handler_vectorcall;
    self->func = Py_NewRef(func);
    self->reference = Py_NewRef(reference);
    self->last = Py_NewRef(last);
    self->request_type = Py_NewRef(request_type);
    return (PyObject *)self;
}

/* Bound to an instance as a function is (a web.View's method). */
static PyObject *
handler_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static PyObject *
handler_repr(MonitoredHandler *self)
{
    return PyUnicode_FromFormat("<lunamon monitored handler %R>", self->func);
}

/* What inspect reads to tell a coroutine function: the reference's. */
static PyObject *
handler_reference_attr(MonitoredHandler *self, void *name)
{
    return PyObject_GetAttrString(self->reference, (const char *)name);
}

static PyGetSetDef handler_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {"__code__", (getter)handler_reference_attr, NULL, "The reference's code.", "__code__"},
    {"__defaults__", (getter)handler_reference_attr, NULL, NULL, "__defaults__"},
    {"__kwdefaults__", (getter)handler_reference_attr, NULL, NULL, "__kwdefaults__"},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MonitoredHandlerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lunamon._speedups.MonitoredHandler",
    .tp_basicsize = sizeof(MonitoredHandler),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A handler decorated with @monitor_request, compiled for the common call.",
    .tp_traverse = (traverseproc)handler_traverse,
    .tp_clear = (inquiry)handler_clear,
    .tp_dealloc = (destructor)handler_dealloc,
    .tp_repr = (reprfunc)handler_repr,
    .tp_vectorcall_offset = offsetof(MonitoredHandler, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = handler_descr_get,
    .tp_getset = handler_getset,
    .tp_dictoffset = offsetof(MonitoredHandler, dict),
    .tp_weaklistoffset = offsetof(MonitoredHandler, weakreflist),
    .tp_new = handler_new,
};

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
        || (str_request = PyUnicode_InternFromString("request")) == NULL
        || (str_method = PyUnicode_InternFromString("method")) == NULL
        || (str_match_info = PyUnicode_InternFromString("match_info")) == NULL
        || (str_route = PyUnicode_InternFromString("route")) == NULL
        || (str_resource = PyUnicode_InternFromString("resource")) == NULL
        || (str_excluded = PyUnicode_InternFromString("excluded")) == NULL
        || (str_name = PyUnicode_InternFromString("name")) == NULL
        || (str_tag_sets = PyUnicode_InternFromString("tag_sets")) == NULL
        || (str_params = PyUnicode_InternFromString("params")) == NULL
        || (str_headers = PyUnicode_InternFromString("headers")) == NULL
        || (str_get = PyUnicode_InternFromString("get")) == NULL
        || (str_prepared = PyUnicode_InternFromString("prepared")) == NULL
        || (str_status = PyUnicode_InternFromString("status")) == NULL
        || (str_emit = PyUnicode_InternFromString("emit")) == NULL
        || (str_throw = PyUnicode_InternFromString("throw")) == NULL
        || (str_close = PyUnicode_InternFromString("close")) == NULL
        || (str_time_ns = PyUnicode_InternFromString("time_ns")) == NULL
        || (str_value = PyUnicode_InternFromString("value")) == NULL
        || (str_handler = PyUnicode_InternFromString("handler")) == NULL
        || (str_append = PyUnicode_InternFromString("append")) == NULL
        || (str_app = PyUnicode_InternFromString("app")) == NULL) {
        return NULL;
    }
    if (PyType_Ready(&CollectorCoreType) < 0 || PyType_Ready(&MonitoredType) < 0
        || PyType_Ready(&RunnerType) < 0 || PyType_Ready(&ReadyType) < 0
        || PyType_Ready(&PrepareGateType) < 0 || PyType_Ready(&ChannelCoreType) < 0
        || PyType_Ready(&EmitterType) < 0 || PyType_Ready(&MonitoredHandlerType) < 0) {
        return NULL;
    }
    if (ready_singleton == NULL && (ready_singleton = PyObject_New(PyObject, &ReadyType)) == NULL) {
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
    if (PyModule_AddObjectRef(module, "Runner", (PyObject *)&RunnerType) < 0
        || PyModule_AddObjectRef(module, "PrepareGate", (PyObject *)&PrepareGateType) < 0
        || PyModule_AddObjectRef(module, "READY", ready_singleton) < 0
        || PyModule_AddObjectRef(module, "ChannelCore", (PyObject *)&ChannelCoreType) < 0
        || PyModule_AddObjectRef(module, "Emitter", (PyObject *)&EmitterType) < 0
        || PyModule_AddObjectRef(module, "MonitoredHandler", (PyObject *)&MonitoredHandlerType)
               < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
