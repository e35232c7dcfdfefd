/* The Python module quipkit._native: thin wrappers that take buffer addresses (tensor.data_ptr())
 * and sizes, release the GIL, and call the C routines. Callers pass contiguous tensors of the
 * documented dtypes; quipkit/native.py does that checking. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "native.h"

static PyObject *py_e8p_nearest(PyObject *self, PyObject *args) {
    unsigned long long x, patterns, lookup, codes;
    long long count;
    if (!PyArg_ParseTuple(args, "KLKKK", &x, &count, &patterns, &lookup, &codes)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    e8p_nearest((const float *)x, count, (const float *)patterns, (const int32_t *)lookup, (int32_t *)codes);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_e8p_two_nearest(PyObject *self, PyObject *args) {
    unsigned long long x, patterns, codes;
    long long count;
    if (!PyArg_ParseTuple(args, "KLKK", &x, &count, &patterns, &codes)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    e8p_two_nearest((const float *)x, count, (const float *)patterns, (int32_t *)codes);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_trellis_encode(PyObject *self, PyObject *args) {
    unsigned long long x, table, states, costs;
    long long count;
    int T, L, k, V, status;
    if (!PyArg_ParseTuple(args, "KLiiiiKKK", &x, &count, &T, &L, &k, &V, &table, &states, &costs)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    status = trellis_encode((const float *)x, count, T, L, k, V, (const float *)table, (int32_t *)states,
                            (float *)costs);
    Py_END_ALLOW_THREADS
    if (status == -1) return PyErr_NoMemory();
    if (status != 0) {
        PyErr_SetString(PyExc_ValueError, "trellis_encode needs L - k * V >= 3 and V in {1, 2}");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"e8p_nearest", py_e8p_nearest, METH_VARARGS,
     "e8p_nearest(x, count, patterns, lookup, codes): x float32[count, 8] -> codes int32[count]"},
    {"e8p_two_nearest", py_e8p_two_nearest, METH_VARARGS,
     "e8p_two_nearest(x, count, patterns, codes): x float32[count, 8] -> codes int32[count, 2], nearest first"},
    {"trellis_encode", py_trellis_encode, METH_VARARGS,
     "trellis_encode(x, count, T, L, k, V, table, states, costs): tail-biting Viterbi of float32[count, T] "
     "-> states int32[count, T / V], costs float32[count]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "quipkit's compiled helpers", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
