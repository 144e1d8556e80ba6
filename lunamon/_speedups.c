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
 * Floats are written by PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0),
 * the very function float.__repr__ calls, so the text is repr's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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

static int
buffer_add_float(Buffer *buf, double value)
{
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

static PyMethodDef methods[] = {
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
    .m_doc = "lunamon's line-protocol encoder, compiled (lunamon.point uses it when built).",
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
        || (tag_pair_name = PyUnicode_InternFromString("_tag_pair")) == NULL) {
        return NULL;
    }
    return PyModule_Create(&module_def);
}
