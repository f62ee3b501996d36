# The starling Python kernel. `starlingd engine` passes this source in the environment and
# runs it as "<starling-kernel>" (see kernel.rs);
# it reads requests from fd 3 and writes replies to fd 4, one JSON document a line, so nothing
# the user's code prints (to sys.stdout or to fd 1) can reach the protocol.
import ast
import base64
import builtins
import io
import json
import linecache
import math
import os
import pickle
import sys
import time
import traceback
import types

_KERNEL_FILE = "<starling-kernel>"
_REQ = os.fdopen(3, "rb")
_REP = 4

_user = types.ModuleType("__main__")
_user.__dict__["__builtins__"] = builtins
sys.modules["__main__"] = _user
_ns = _user.__dict__
_count = 0
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _is_json(v):
    t = type(v)
    if v is None or t is bool:
        return True
    if t is str:
        # A lone surrogate (a file name that is not UTF-8, say) has no JSON form: pickle it.
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if t is int:
        return _INT_MIN <= v <= _INT_MAX
    if t is float:
        return math.isfinite(v)
    if t is list:
        return all(_is_json(x) for x in v)
    if t is dict:
        return all(type(k) is str and _is_json(x) for k, x in v.items())
    return False


def _safe_str(e):
    try:
        return str(e)
    except Exception as inner:  # noqa: BLE001 - a broken __str__ must not kill the kernel
        return "<%s (str failed: %s)>" % (type(e).__name__, inner)


def _name(kind):
    """A file name for tracebacks, never reused in this kernel's life."""
    global _names
    _names += 1
    return "<%s-%d>" % (kind, _names)


def _safe_repr(v):
    try:
        return repr(v)
    except Exception as e:  # noqa: BLE001 - a broken __repr__ must not kill the kernel
        return "<%s object (repr failed: %s)>" % (type(v).__name__, e)


def _encode(v):
    if _is_json(v):
        return {"v": v}
    try:
        data = pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - unpicklable: send what we can show
        return {"o": _safe_repr(v)}
    return {"p": base64.b64encode(data).decode("ascii"), "r": _safe_repr(v)}


def _decode(v):
    if type(v) is dict and len(v) == 1:
        if "__starling_pickle__" in v:
            return pickle.loads(base64.b64decode(v["__starling_pickle__"]))
        if "__starling_opaque__" in v:
            raise TypeError("an argument came back from an engine as repr only (%s) and cannot be sent again" % v["__starling_opaque__"])
    if type(v) is list:
        return [_decode(x) for x in v]
    if type(v) is dict:
        return {k: _decode(x) for k, x in v.items()}
    return v


def _error(e):
    if isinstance(e, SyntaxError):
        lines = traceback.format_exception_only(type(e), e)
    else:
        # Drop the kernel's own frames: the user sees their code only.
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == _KERNEL_FILE:
            tb = tb.tb_next
        lines = traceback.format_exception(type(e), e, tb)
    return {
        "ok": False,
        "ename": type(e).__name__,
        "evalue": _safe_str(e),
        "traceback": "".join(lines),
    }


_compiled = {}
_maps = {}
_names = 0
_own_modules = set()
_funcs = {}
_modules = {}


def _resolve(func):
    """A callable from its description: {"expr": source} or {"module", "source", "attr"}."""
    if "expr" in func:
        expr = func["expr"]
        code = _funcs.get(expr)
        if code is None:
            filename = _name("func")
            linecache.cache[filename] = (len(expr), None, expr.splitlines(True), filename)
            if len(_funcs) >= 512:
                _funcs.clear()
            code = _funcs[expr] = compile(expr, filename, "eval")
        return eval(code, _ns)
    key = (func["module"], func["source"])
    mod = _modules.get(key)
    if mod is None:
        name = func["module"]
        if name in sys.modules and name not in _own_modules:
            # Never shadow a module already imported (a user's random.py must not replace
            # the standard library's for the rest of this kernel's life).
            name = "starling_user_" + name
        _own_modules.add(name)
        filename = func["module"] + ".py"
        source = func["source"]
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        mod = types.ModuleType(name)
        mod.__file__ = filename
        # Registered under its name, so its functions and classes pickle by reference.
        sys.modules[name] = mod
        exec(compile(source, filename, "exec"), mod.__dict__)
        if len(_modules) >= 64:
            _modules.clear()
        _modules[key] = mod
    try:
        return getattr(mod, func["attr"])
    except AttributeError:
        raise AttributeError("%s has no function %r" % (func["module"] + ".py", func["attr"])) from None


def _call(func, item):
    """One map item: its encoded result, or {"e": error}."""
    try:
        return _encode(func(item))
    except Exception as e:  # noqa: BLE001 - an item's error is that item's result
        return {"e": _error(e)}


def _compile(code):
    """Compiles a cell once: the body, and its final expression (if any) for the result."""
    hit = _compiled.get(code)
    if hit is not None:
        return hit
    if len(_compiled) >= 512:
        _compiled.clear()
    filename = _name("px")
    # Tracebacks then show the user's lines, as IPython's do.
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    tree = ast.parse(code, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), filename, "eval")
    hit = _compiled[code] = (compile(tree, filename, "exec"), last)
    return hit


def _execute(code):
    body, last = _compile(code)
    exec(body, _ns)
    if last is not None:
        return eval(last, _ns)
    return None


def _run(task):
    global _count
    op = task["op"]
    out, err = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr = out, err
    started = time.time()
    try:
        if op == "init":
            os.environ["STARLING_ENGINE_ID"] = str(task["engine"])
            reply = {"ok": True, "v": None}
        elif op == "execute":
            _count += 1
            value = _execute(task["code"])
            reply = _encode(value)
            reply["ok"] = True
            if value is not None:
                reply["d"] = _safe_repr(value)
        elif op == "map":
            job = task["job"]
            if "func" in task:
                _maps[job] = _resolve(task["func"])
            func = _maps.get(job)
            if func is None:
                raise RuntimeError("this kernel does not know the function of job %d" % job)
            reply = {"ok": True, "items": [_call(func, x) for x in _decode(task["items"])]}
        elif op == "apply":
            func = _resolve(task["func"])
            reply = _encode(func(*_decode(task["args"])))
            reply["ok"] = True
        elif op == "push":
            for name, value in task["values"].items():
                _ns[name] = _decode(value)
            reply = {"ok": True, "v": None}
        elif op == "pull":
            names = task["names"]
            missing = [n for n in names if n not in _ns]
            if missing:
                raise NameError("name %r is not defined on this engine" % missing[0])
            values = [_ns[n] for n in names]
            reply = _encode(values[0] if len(values) == 1 else values)
            reply["ok"] = True
        else:
            reply = {"ok": False, "ename": "KernelError", "evalue": "unknown op %r" % op, "traceback": ""}
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are task errors too
        reply = _error(e)
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    reply["out"] = out.getvalue()
    reply["err"] = err.getvalue()
    for job in task.get("forget", ()):
        _maps.pop(job, None)
    reply["n"] = _count
    reply["t0"] = int(started * 1e6)
    reply["t1"] = int(time.time() * 1e6)
    return reply


def _write(data):
    view = memoryview(data)
    while view:
        view = view[os.write(_REP, view):]


def main():
    _write(b'{"ready": %d}\n' % os.getpid())
    for line in _REQ:
        tasks = json.loads(line)
        for task in tasks:
            # One line per task, written at once: if a task kills the process, the results
            # before it are already out.
            # Text that cannot be UTF-8 (lone surrogates in output or messages) becomes '?'
            # rather than a line the engine cannot read.
            line = json.dumps(_run(task), separators=(",", ":"), ensure_ascii=False)
            _write(line.encode("utf-8", "replace") + b"\n")


main()
