/* The compiled hot path of logical capture: pgoutput tuple bytes -> the object format's CSV row.
 *
 * The pure-Python code (capture/logical/pgoutput.py: decode_tuple, capture/logical/encode.py:
 * RowEncoder) is the reference. This core only ever takes the common path of that code and
 * returns None for anything else (a malformed tuple, an unchanged TOASTed value, an empty
 * string, a value that needs quotes, a converted form it does not handle, a quarantine rule):
 * the caller then runs the Python code on the same input, so every rare or hostile value gets
 * the reference's bytes (or error) by construction. tests/unit/test_hotpath.py drives both
 * with generated values and compares the bytes.
 *
 * The plan is one byte per column, the code of the Python fast function that column uses
 * (capture/logical/encode.py: ColumnType.fast, _PLAN_CODES).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Snowflake's VARCHAR limit (source/values.py MAX_TEXT): a longer row takes the reference. */
#define MAX_TEXT (16 * 1024 * 1024)

enum {
    PLAN_PASS = 0,          /* the text form as it is (no fast function) */
    PLAN_BYTEA = 1,         /* \x<hex> -> <hex> */
    PLAN_TIMESTAMPTZ = 2,   /* 2011-03-27 00:30:00+00 -> 2011-03-27T00:30:00+00:00 */
    PLAN_TIMESTAMP = 3,     /* 2011-03-27 00:30:00 -> 2011-03-27T00:30:00 */
    PLAN_DATE = 4,          /* 2011-03-27 */
    PLAN_NUMBER = 5,        /* ends in a digit */
    PLAN_UNCONSTRAINED = 6, /* ends in a digit and fits NUMBER(38, 9) */
    PLAN_TIME = 7,          /* not 24:00:00 */
    PLAN_CAREFUL = 8,       /* never: always the reference */
};

typedef struct {
    const char *p;
    Py_ssize_t len; /* -1: NULL */
} Field;

/* 1 for the bytes that make a CSV field need quotes: comma, quote, CR, LF. */
static unsigned char needs_quote[256];

static inline int
is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* The output length of one non-NULL value under its plan code, or -1 when the value is not in
 * the common form (the caller then takes the reference path). Mirrors the *_fast functions of
 * encode.py; an empty value always goes to the reference (written there as ""). */
static Py_ssize_t
field_length(unsigned char code, const char *v, Py_ssize_t n)
{
    Py_ssize_t i, dot;
    if (n == 0)
        return -1;
    switch (code) {
    case PLAN_PASS:
        break;
    case PLAN_BYTEA:
        if (n <= 2)
            return -1;
        break;
    case PLAN_TIMESTAMPTZ:
        if (n < 22 || v[4] != '-' || v[10] != ' ' || v[n - 1] == 'C')
            return -1;
        break;
    case PLAN_TIMESTAMP:
        if (n < 19 || v[4] != '-' || v[10] != ' ' || v[n - 1] == 'C')
            return -1;
        break;
    case PLAN_DATE:
        if (n != 10 || v[4] != '-')
            return -1;
        break;
    case PLAN_NUMBER:
        if (!is_digit(v[n - 1]))
            return -1;
        break;
    case PLAN_UNCONSTRAINED:
        if (!is_digit(v[n - 1]))
            return -1;
        dot = -1;
        for (i = 0; i < n; i++) {
            if (v[i] == '.') {
                dot = i;
                break;
            }
        }
        if (dot < 0 ? n > 29 : (dot > 29 || n - dot > 10))
            return -1;
        break;
    case PLAN_TIME:
        if (n >= 3 && v[0] == '2' && v[1] == '4' && v[2] == ':')
            return -1;
        break;
    default:
        return -1;
    }
    for (i = 0; i < n; i++) {
        if (needs_quote[(unsigned char)v[i]])
            return -1;
    }
    switch (code) {
    case PLAN_BYTEA:
        return n - 2;
    case PLAN_TIMESTAMPTZ:
        return n + 3;
    default:
        return n;
    }
}

static char *
write_field(char *out, unsigned char code, const char *v, Py_ssize_t n)
{
    switch (code) {
    case PLAN_BYTEA:
        memcpy(out, v + 2, n - 2);
        return out + n - 2;
    case PLAN_TIMESTAMPTZ:
        memcpy(out, v, 10);
        out[10] = 'T';
        memcpy(out + 11, v + 11, n - 11);
        memcpy(out + n, ":00", 3);
        return out + n + 3;
    case PLAN_TIMESTAMP:
        memcpy(out, v, 10);
        out[10] = 'T';
        memcpy(out + 11, v + 11, n - 11);
        return out + n;
    default:
        memcpy(out, v, n);
        return out + n;
    }
}

/* (day, row + tail) from the fields, or Py_None when a field needs the reference. ``tail`` is
 * appended after the row (the _cdc_* columns and the line end), ``tail`` NULL: none. */
static PyObject *
build(const unsigned char *plan, const Field *fields, Py_ssize_t count, Py_ssize_t partition,
      const char *tail, Py_ssize_t tail_len)
{
    Py_ssize_t total = count > 0 ? count - 1 : 0, i, n;
    PyObject *row, *day, *result;
    char *out;

    for (i = 0; i < count; i++) {
        if (fields[i].len < 0)
            continue;
        n = field_length(plan[i], fields[i].p, fields[i].len);
        if (n < 0)
            Py_RETURN_NONE;
        total += n;
    }
    if (total > MAX_TEXT)
        Py_RETURN_NONE;
    row = PyBytes_FromStringAndSize(NULL, total + tail_len);
    if (row == NULL)
        return NULL;
    out = PyBytes_AS_STRING(row);
    for (i = 0; i < count; i++) {
        if (i > 0)
            *out++ = ',';
        if (fields[i].len >= 0)
            out = write_field(out, plan[i], fields[i].p, fields[i].len);
    }
    if (tail_len > 0)
        memcpy(out, tail, tail_len);
    if (partition < 0 || fields[partition].len < 0) {
        day = PyBytes_FromStringAndSize(NULL, 0);
    }
    else {
        n = fields[partition].len < 10 ? fields[partition].len : 10;
        day = PyBytes_FromStringAndSize(fields[partition].p, n);
    }
    if (day == NULL) {
        Py_DECREF(row);
        return NULL;
    }
    result = PyTuple_Pack(2, day, row);
    Py_DECREF(day);
    Py_DECREF(row);
    return result;
}

#define STACK_FIELDS 64

static Field *
fields_for(Py_ssize_t count, Field *stack)
{
    Field *found;
    if (count <= STACK_FIELDS)
        return stack;
    found = PyMem_New(Field, count);
    if (found == NULL)
        PyErr_NoMemory();
    return found;
}

static int
as_index(PyObject *obj, Py_ssize_t *out)
{
    *out = PyLong_AsSsize_t(obj);
    return !(*out == -1 && PyErr_Occurred());
}

/* decode_tuple(buf, pos, unchanged) -> (values, pos after them) | None (malformed: the caller's
 * Python decoder raises the error that says what is wrong). ``unchanged``: the marker of an
 * unchanged TOASTed value (pgoutput.UNCHANGED). */
static PyObject *
decode_tuple(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *b;
    Py_ssize_t n, pos, count, i, len;
    PyObject *values, *item;

    if (nargs != 3 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "decode_tuple(buf: bytes, pos: int, unchanged)");
        return NULL;
    }
    b = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    n = PyBytes_GET_SIZE(args[0]);
    if (!as_index(args[1], &pos))
        return NULL;
    if (pos < 0 || pos > n - 2)
        Py_RETURN_NONE;
    count = ((Py_ssize_t)b[pos] << 8) | b[pos + 1];
    pos += 2;
    values = PyList_New(count);
    if (values == NULL)
        return NULL;
    for (i = 0; i < count; i++) {
        if (pos >= n)
            goto malformed;
        switch (b[pos]) {
        case 't':
            if (pos > n - 5)
                goto malformed;
            len = ((Py_ssize_t)b[pos + 1] << 24) | ((Py_ssize_t)b[pos + 2] << 16) |
                  ((Py_ssize_t)b[pos + 3] << 8) | b[pos + 4];
            pos += 5;
            if (len > n - pos)
                goto malformed;
            item = PyBytes_FromStringAndSize((const char *)b + pos, len);
            if (item == NULL) {
                Py_DECREF(values);
                return NULL;
            }
            pos += len;
            break;
        case 'n':
            item = Py_NewRef(Py_None);
            pos++;
            break;
        case 'u':
            item = Py_NewRef(args[2]);
            pos++;
            break;
        default:
            goto malformed;
        }
        PyList_SET_ITEM(values, i, item);
    }
    return Py_BuildValue("(Nn)", values, pos);
malformed:
    Py_DECREF(values);
    Py_RETURN_NONE;
}

/* encode_row(plan, partition, values) -> (day, row) | None: RowEncoder.encode's common path on
 * decoded values (bytes or None). */
static PyObject *
encode_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Field stack[STACK_FIELDS], *fields;
    Py_ssize_t partition, count, i;
    PyObject *values, *item, *result;

    if (nargs != 3 || !PyBytes_Check(args[0]) || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "encode_row(plan: bytes, partition: int, values: list)");
        return NULL;
    }
    if (!as_index(args[1], &partition))
        return NULL;
    values = args[2];
    count = PyList_GET_SIZE(values);
    if (count != PyBytes_GET_SIZE(args[0]) || partition >= count)
        Py_RETURN_NONE;
    fields = fields_for(count, stack);
    if (fields == NULL)
        return NULL;
    for (i = 0; i < count; i++) {
        item = PyList_GET_ITEM(values, i);
        if (item == Py_None) {
            fields[i].p = NULL;
            fields[i].len = -1;
        }
        else if (PyBytes_CheckExact(item)) {
            fields[i].p = PyBytes_AS_STRING(item);
            fields[i].len = PyBytes_GET_SIZE(item);
        }
        else {
            /* UNCHANGED or anything else: the reference decides. */
            if (fields != stack)
                PyMem_Free(fields);
            Py_RETURN_NONE;
        }
    }
    result = build((const unsigned char *)PyBytes_AS_STRING(args[0]), fields, count, partition,
                   NULL, 0);
    if (fields != stack)
        PyMem_Free(fields);
    return result;
}

/* Reads the TupleData at *pos into ``fields`` (pointers into ``b``), which must hold exactly
 * ``count`` values; moves *pos past it. 0, or -1 to decline: malformed bytes, another number
 * of values, or an unchanged TOASTed value ('u'). */
static int
read_tuple(const unsigned char *b, Py_ssize_t n, Py_ssize_t *at, Field *fields, Py_ssize_t count)
{
    Py_ssize_t pos = *at, i, len;
    if (pos < 0 || pos > n - 2 || (((Py_ssize_t)b[pos] << 8) | b[pos + 1]) != count)
        return -1;
    pos += 2;
    for (i = 0; i < count; i++) {
        if (pos >= n)
            return -1;
        switch (b[pos]) {
        case 't':
            if (pos > n - 5)
                return -1;
            len = ((Py_ssize_t)b[pos + 1] << 24) | ((Py_ssize_t)b[pos + 2] << 16) |
                  ((Py_ssize_t)b[pos + 3] << 8) | b[pos + 4];
            pos += 5;
            if (len > n - pos)
                return -1;
            fields[i].p = (const char *)b + pos;
            fields[i].len = len;
            pos += len;
            break;
        case 'n':
            fields[i].p = NULL;
            fields[i].len = -1;
            pos++;
            break;
        default:
            return -1;
        }
    }
    *at = pos;
    return 0;
}

/* ``,op,lsn<ts>\n`` into ``tail``: its length, -1 to decline (too long, a NUL in op), -2 on an
 * error set. */
static int
make_tail(char *tail, size_t size, PyObject *op, PyObject *lsn_obj, PyObject *ts)
{
    unsigned long long lsn = PyLong_AsUnsignedLongLong(lsn_obj);
    Py_ssize_t op_len = PyBytes_GET_SIZE(op), ts_len = PyBytes_GET_SIZE(ts);
    int len;
    if (lsn == (unsigned long long)-1 && PyErr_Occurred())
        return -2;
    if (op_len + ts_len > 64 || (Py_ssize_t)strlen(PyBytes_AS_STRING(op)) != op_len)
        return -1;
    len = snprintf(tail, size, ",%s,%llu", PyBytes_AS_STRING(op), lsn);
    if (len < 0 || (size_t)len + ts_len + 1 >= size)
        return -1;
    memcpy(tail + len, PyBytes_AS_STRING(ts), ts_len);
    len += (int)ts_len;
    tail[len++] = '\n';
    return len;
}

/* encode_change(buf, pos, plan, partition, op, lsn, ts) -> (day, line) | None: one tuple of a
 * pgoutput message straight to its object line, ``row,op,lsn<ts>\n`` (ts: b",<commit ts>,"),
 * without a list of values in between. None: the tuple is malformed, holds an unchanged
 * TOASTed value or a value the common path does not take. */
static PyObject *
encode_change(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Field stack[STACK_FIELDS], *fields;
    Py_ssize_t pos, count, partition;
    char tail[128];
    int tail_len;
    PyObject *result = Py_None;

    if (nargs != 7 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[2]) ||
        !PyBytes_Check(args[4]) || !PyBytes_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError,
                        "encode_change(buf: bytes, pos: int, plan: bytes, partition: int, "
                        "op: bytes, lsn: int, ts: bytes)");
        return NULL;
    }
    if (!as_index(args[1], &pos) || !as_index(args[3], &partition))
        return NULL;
    tail_len = make_tail(tail, sizeof tail, args[4], args[5], args[6]);
    if (tail_len == -2)
        return NULL;
    count = PyBytes_GET_SIZE(args[2]);
    if (tail_len < 0 || partition >= count)
        Py_RETURN_NONE;
    fields = fields_for(count, stack);
    if (fields == NULL)
        return NULL;
    if (read_tuple((const unsigned char *)PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]),
                   &pos, fields, count) == 0)
        result = build((const unsigned char *)PyBytes_AS_STRING(args[2]), fields, count,
                       partition, tail, tail_len);
    else
        Py_INCREF(result);
    if (fields != stack)
        PyMem_Free(fields);
    return result;
}

/* encode_update(buf, pos, plan, partition, keys, lsn, ts) -> (day, line) | None: an Update
 * message from ``pos``, the byte after its relation (an optional 'K'/'O' old tuple, then 'N'
 * and the new one), as the line of the new row with op U, when the key (``keys``: the key
 * columns' positions, two bytes each, big-endian) is the same in the old tuple as in the new
 * one. None: the key changed (a D for the old key comes first), an unchanged TOASTed value,
 * malformed bytes, or a value the common path does not take. */
static PyObject *
encode_update(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Field stack[STACK_FIELDS], old_stack[STACK_FIELDS], *fields, *old = NULL;
    const unsigned char *b, *keys;
    Py_ssize_t n, pos, count, partition, i, k, nkeys;
    char tail[128];
    int tail_len;
    PyObject *result = NULL, *op;

    if (nargs != 7 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[2]) ||
        !PyBytes_Check(args[4]) || !PyBytes_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError,
                        "encode_update(buf: bytes, pos: int, plan: bytes, partition: int, "
                        "keys: bytes, lsn: int, ts: bytes)");
        return NULL;
    }
    if (!as_index(args[1], &pos) || !as_index(args[3], &partition))
        return NULL;
    op = PyBytes_FromStringAndSize("U", 1);
    if (op == NULL)
        return NULL;
    tail_len = make_tail(tail, sizeof tail, op, args[5], args[6]);
    Py_DECREF(op);
    if (tail_len == -2)
        return NULL;
    count = PyBytes_GET_SIZE(args[2]);
    if (tail_len < 0 || partition >= count)
        Py_RETURN_NONE;
    b = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    n = PyBytes_GET_SIZE(args[0]);
    keys = (const unsigned char *)PyBytes_AS_STRING(args[4]);
    nkeys = PyBytes_GET_SIZE(args[4]) / 2;
    fields = fields_for(count, stack);
    if (fields == NULL)
        return NULL;
    if (pos >= 0 && pos < n && (b[pos] == 'K' || b[pos] == 'O')) {
        old = fields_for(count, old_stack);
        if (old == NULL)
            goto done;
        pos++;
        if (read_tuple(b, n, &pos, old, count) < 0)
            goto decline;
    }
    if (pos < 0 || pos >= n || b[pos] != 'N')
        goto decline;
    pos++;
    if (read_tuple(b, n, &pos, fields, count) < 0)
        goto decline;
    if (old != NULL) {
        for (i = 0; i < nkeys; i++) {
            k = ((Py_ssize_t)keys[2 * i] << 8) | keys[2 * i + 1];
            if (k >= count || old[k].len != fields[k].len ||
                (old[k].len > 0 && memcmp(old[k].p, fields[k].p, old[k].len) != 0))
                goto decline;
        }
    }
    result = build((const unsigned char *)PyBytes_AS_STRING(args[2]), fields, count, partition,
                   tail, tail_len);
    goto done;
decline:
    result = Py_NewRef(Py_None);
done:
    if (fields != stack)
        PyMem_Free(fields);
    if (old != NULL && old != old_stack)
        PyMem_Free(old);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_tuple", (PyCFunction)(void (*)(void))decode_tuple, METH_FASTCALL,
     "decode_tuple(buf, pos, unchanged) -> (values, pos) | None"},
    {"encode_row", (PyCFunction)(void (*)(void))encode_row, METH_FASTCALL,
     "encode_row(plan, partition, values) -> (day, row) | None"},
    {"encode_change", (PyCFunction)(void (*)(void))encode_change, METH_FASTCALL,
     "encode_change(buf, pos, plan, partition, op, lsn, ts) -> (day, line) | None"},
    {"encode_update", (PyCFunction)(void (*)(void))encode_update, METH_FASTCALL,
     "encode_update(buf, pos, plan, partition, keys, lsn, ts) -> (day, line) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "cdc_daemon.source._hotpath",
    "The compiled hot path of logical capture (see cdc_daemon/source/hotpath.py).",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__hotpath(void)
{
    needs_quote[','] = needs_quote['"'] = needs_quote['\n'] = needs_quote['\r'] = 1;
    return PyModule_Create(&module);
}
