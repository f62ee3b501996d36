# The starling Python kernel. `starlingd engine` passes this source in the environment and
# runs it as "<starling-kernel>" (see kernel.rs), with private pipes as fds 3 (requests), 4
# (replies) and 5 (control). The first two carry binary frames:
#
#   u64 length of the rest | u32 header length | u32 buffer count | header (JSON)
#       | per buffer: u64 length, bytes
#
# A request frame holds a batch of tasks; a reply frame answers one task and names it. Pickles
# and their out-of-band buffers (NumPy data, pickle protocol 5) travel as raw buffers. The pipes
# are moved to close-on-exec fds, and a process the task forks loses them at once, so nothing
# user code writes or starts can reach the protocol.
#
# The control pipe carries u64 ids of tasks the engine no longer wants (aborted, timed out),
# and each write comes with a SIGINT: the handler reads the pipe, raises KeyboardInterrupt in
# the running task if that task is one of them (or if the id is 2**64-1, "whatever runs"), and
# otherwise only remembers them, so they are skipped when their turn comes. An interrupt
# never lands in the wrong task or in the kernel's own loop, and a task costs no extra
# system call.
#
# While a batch of tasks runs, fds 1 and 2 point at files of their own: what a task writes —
# print, os.system, a C extension, a child process — is its stdout and stderr, in order, bounded
# when read back after it. Between batches they point where the engine put them (its bounded
# log). While a task runs, a thread sends on what it has written so far, every 0.2 s, as
# frames {"stream": id, "out": .., "err": ..} (for `%px --stream`); its reply still has all.
import ast
import base64
import builtins
import codecs
import functools
import io
import json
import linecache
import math
import os
import pickle
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
import types

# The engine set GLIBC_TUNABLES so that this process's malloc puts large blocks on huge pages;
# what tasks start gets the variable as the engine had it.
_tunables = os.environ.pop("STARLING_GLIBC_TUNABLES", None)
if _tunables is not None:
    if _tunables:
        os.environ["GLIBC_TUNABLES"] = _tunables
    else:
        os.environ.pop("GLIBC_TUNABLES", None)

_KERNEL_FILE = "<starling-kernel>"
_PID = os.getpid()
# os.dup makes close-on-exec fds; fds 3 and 4 are then free for whatever user code opens.
_RFD, _WFD, _CFD = os.dup(3), os.dup(4), os.dup(5)
for _fd in (3, 4, 5):
    os.close(_fd)
# Buffered: a small request frame, length and body, comes in with one read.
_R = io.BufferedReader(io.FileIO(_RFD, "rb", closefd=True), 1 << 16)
os.set_blocking(_CFD, False)
_ANY = (1 << 64) - 1
_cancelled = set()
_current = None  # the id of the task running now
_partial = b""  # the start of an id whose rest is still in the pipe


def _read_control():
    # Takes what the engine wrote on the control pipe; never blocks.
    global _partial
    while True:
        try:
            data = os.read(_CFD, 65536)
        except (BlockingIOError, OSError):
            return
        if not data:
            return
        data = _partial + data
        whole = len(data) // 8 * 8
        _partial = data[whole:]
        _cancelled.update(struct.unpack("<%dQ" % (whole // 8), data[:whole]))


def _on_sigint(signum, frame):
    _read_control()
    if _current is None:
        return
    if _ANY in _cancelled or _current in _cancelled:
        _cancelled.discard(_ANY)
        raise KeyboardInterrupt


def _forked():
    # A child of a task (os.fork, multiprocessing) must never speak for this kernel.
    try:
        _R.close()
        os.close(_WFD)
        os.close(_CFD)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # The streaming thread is not in the child; its lock may have been taken when it forked.
    streamer = globals().get("_STREAM")
    if streamer is not None:
        streamer.lock = threading.Lock()
        streamer.task = None


os.register_at_fork(after_in_child=_forked)
_PYTHON = "%d.%d" % sys.version_info[:2]

# The most of a task's stdout (and of its stderr) that comes back with its result. (The capture
# file itself holds what the task wrote until it is read back, in the kernel's temp folder.)
_CAPTURE_LIMIT = 1 << 20

try:  # C code's printf output waits in libc's buffer (fds 1 and 2 are files): flushed per task
    import ctypes

    _c_fflush = ctypes.CDLL(None).fflush
    _c_fflush.argtypes = [ctypes.c_void_p]
except Exception:  # noqa: BLE001 - no ctypes or no libc: Python-level output is still flushed
    _c_fflush = None


class _Capture:
    """One of fds 1 and 2 while a task runs: a file of its own, read back (bounded) after."""

    def __init__(self, fd):
        self.fd = fd
        self.between = os.dup(fd)  # where it points between tasks; close-on-exec
        self.file = tempfile.TemporaryFile()
        # Python-level writes go through the fd too, so print and os.system keep their order.
        self.text = open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)

    def start(self):
        os.dup2(self.file.fileno(), self.fd)

    def stop(self):
        os.dup2(self.between, self.fd)

    def take(self):
        """What was written since the last take."""
        try:
            self.text.flush()
        except (OSError, ValueError):
            pass
        size = os.fstat(self.file.fileno()).st_size
        if not size:
            return ""
        self.file.seek(0)
        data = self.file.read(_CAPTURE_LIMIT)
        self.file.seek(0)
        self.file.truncate()
        text = data.decode("utf-8", "replace")
        if size > _CAPTURE_LIMIT:
            text += "\n[starling: %d more bytes of this output were cut]\n" % (size - _CAPTURE_LIMIT)
        return text


_OUT, _ERR = _Capture(1), _Capture(2)

# How often a running task's new output is sent on, and the most of each stream at a time.
_STREAM_EVERY = 0.2
_STREAM_PIECE = 256 << 10


class _Streamer:
    """Sends what the running task has written so far, while it runs: a thread that looks at
    the capture files every _STREAM_EVERY seconds, and reads what is new there with pread
    (the task's own writes keep their file offset). A task that ends within the period costs
    it nothing but setting two attributes. A look that finds no task begun since the last one
    puts the thread to sleep until one begins, so an idle kernel is not woken. The lock also
    keeps its frames and the main thread's apart on the reply pipe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.task = None  # the task whose output is sent on
        self.seen = None  # (its id, how often this thread has seen it running)
        self.sent = [0, 0]
        self.decoders = None
        self.count = 0  # tasks begun, so that the thread tells one from the next
        self.idle = False  # the thread waits for `wake`
        self.wake = threading.Event()
        threading.Thread(target=self._loop, name="starling-stream", daemon=True).start()

    def begin(self, task):
        self.count += 1
        self.task = task
        if self.idle:  # read after the writes above: see _loop
            self.idle = False
            self.wake.set()

    def end(self):
        with self.lock:
            self.task = None
            self.decoders = None

    def _loop(self):
        looked = self.count
        while True:
            if self.task is None and self.count == looked:
                # Nothing begun since the last look: sleep until a task begins. `idle` is set
                # before the second look, so a task begun in between either is seen here or
                # sees `idle` and wakes this thread.
                self.idle = True
                if self.task is None and self.count == looked:
                    self.wake.wait()
                self.wake.clear()
                self.idle = False
            looked = self.count
            time.sleep(_STREAM_EVERY)
            try:
                with self.lock:
                    self._send()
            except Exception:  # noqa: BLE001 - the task's reply still carries its output
                pass

    def _send(self):
        task = self.task
        if task is None:
            return
        if self.seen is None or self.seen[0] != self.count:
            # Begun since the last look: from the start of the capture files.
            self.seen = (self.count, task)
            self.sent = [0, 0]
            self.decoders = [
                codecs.getincrementaldecoder("utf-8")("replace"),
                codecs.getincrementaldecoder("utf-8")("replace"),
            ]
        text = []
        for i, cap in enumerate((_OUT, _ERR)):
            # What is in the file: print's lines are (line-buffered); a line not ended yet
            # comes with the next look or the reply.
            fd = cap.file.fileno()
            size = min(os.fstat(fd).st_size, _CAPTURE_LIMIT)
            new = b""
            if size > self.sent[i]:
                # A piece well inside the frame limit even as escaped JSON; the rest comes at
                # the next look.
                most = min(_STREAM_PIECE, _limit // 16)
                new = os.pread(fd, min(size - self.sent[i], most), self.sent[i])
                self.sent[i] += len(new)
            text.append(self.decoders[i].decode(new) if new else "")
        if text[0] or text[1]:
            _write_frame_locked({"stream": task, "out": text[0], "err": text[1]}, [])


def _take_outputs():
    """A task's stdout and stderr: what C code left in libc's buffers is flushed first (one
    fflush for both)."""
    _STREAM.end()
    if _c_fflush is not None:
        try:
            _c_fflush(None)
        except (OSError, ValueError):
            pass
    return _OUT.take(), _ERR.take()


class _Reference:
    """A name in the engine's namespace, standing in for an argument (starling.Reference)."""

    def __init__(self, name):
        self.name = name


# Clients pickle `starling.Reference('a')` as `starling_kernel.Reference`: this module.
_kernel_module = types.ModuleType("starling_kernel")
_kernel_module.Reference = _Reference
_Reference.__module__ = "starling_kernel"
_Reference.__qualname__ = _Reference.__name__ = "Reference"
sys.modules["starling_kernel"] = _kernel_module

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


# A repr is for people to read: a large value's is cut here, so that its text does not travel
# (and stay in the controller) beside the value itself.
_REPR_LIMIT = 64 * 1024


def _safe_repr(v):
    try:
        text = repr(v)
    except Exception as e:  # noqa: BLE001 - a broken __repr__ must not kill the kernel
        return "<%s object (repr failed: %s)>" % (type(v).__name__, e)
    if len(text) > _REPR_LIMIT:
        return "%s... (%d characters in all)" % (text[:_REPR_LIMIT], len(text))
    return text


def _dumps(v, bufs):
    def keep(pb):
        try:
            bufs.append(pb.raw())
        except BufferError:  # not contiguous: stays inside the pickle
            return True
        return False

    try:
        return pickle.dumps(v, protocol=5, buffer_callback=keep)
    except Exception:  # noqa: BLE001 - a lambda, a class defined here: cloudpickle may manage
        try:
            import cloudpickle
        except ImportError:
            raise
        return cloudpickle.dumps(v, protocol=5, buffer_callback=keep)


def _encode(v, bufs):
    """A value for a reply: {"v": json}, {"p": [buffer indices], "r": repr} or {"o": repr}."""
    if _is_json(v):
        return {"v": v}
    mine = []
    try:
        data = _dumps(v, mine)
    except Exception:  # noqa: BLE001 - unpicklable: send what we can show
        return {"o": _safe_repr(v)}
    first = len(bufs)
    bufs.append(data)
    bufs.extend(mine)
    out = {"p": list(range(first, len(bufs))), "r": _safe_repr(v)}
    # Small containers only: a large value's JSON form would double what travels.
    if type(v) in (tuple, list, dict) and len(data) <= _REPR_LIMIT:
        try:
            j = _lists_for_tuples(v)
        except RecursionError:  # a container that holds itself
            j = _NOT_JSON
        if j is not _NOT_JSON:
            out["j"] = j
    return out


_NOT_JSON = object()


def _lists_for_tuples(v):
    """v as JSON with its tuples as lists, or _NOT_JSON (for --output json: a tuple shows as a
    list there, never as its repr)."""
    t = type(v)
    if t is tuple or t is list:
        out = []
        for x in v:
            y = _lists_for_tuples(x)
            if y is _NOT_JSON:
                return _NOT_JSON
            out.append(y)
        return out
    if t is dict:
        out = {}
        for k, x in v.items():
            y = _lists_for_tuples(x) if type(k) is str else _NOT_JSON
            if y is _NOT_JSON:
                return _NOT_JSON
            out[k] = y
        return out
    return v if _is_json(v) else _NOT_JSON


def _loads(refs, bufs):
    try:
        return pickle.loads(bufs[refs[0]], buffers=[bufs[i] for i in refs[1:]])
    except ModuleNotFoundError as e:
        if e.name == "cloudpickle":
            raise ModuleNotFoundError(
                "this engine's Python (%s) lacks cloudpickle, which functions and objects sent "
                "from Python clients need: install it on the nodes (`%s -m pip install cloudpickle`, "
                "e.g. in the cluster spec's `setup`)" % (sys.executable, sys.executable),
                name="cloudpickle",
            ) from None
        raise
    except Exception as e:  # noqa: BLE001 - name the likely cause, keep the error
        if "cloudpickle" not in repr(e):
            raise
        import cloudpickle

        raise RuntimeError(
            "this engine could not unpickle what the client sent (%s: %s); it has cloudpickle %s "
            "(%s), and the client's must be the same version"
            % (type(e).__name__, e, cloudpickle.__version__, sys.executable)
        ) from None


def _decode(v, bufs):
    """A value from a request, in the form _encode writes."""
    if "v" in v:
        return v["v"]
    if "p" in v:
        return _loads(v["p"], bufs)
    raise TypeError("an argument came back from an engine as repr only (%s) and cannot be sent again" % v.get("o"))


def _nested(v):
    """A JSON value, with pickles nested in it (a Rust client's load-balanced apply)."""
    if type(v) is dict:
        if len(v) == 1 and "__starling_pickle__" in v:
            parts = [base64.b64decode(p) for p in v["__starling_pickle__"]]
            return pickle.loads(parts[0], buffers=parts[1:])
        if len(v) == 1 and "__starling_opaque__" in v:
            raise TypeError("an argument came back from an engine as repr only (%s) and cannot be sent again" % v["__starling_opaque__"])
        return {k: _nested(x) for k, x in v.items()}
    if type(v) is list:
        return [_nested(x) for x in v]
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


def _from_main(f):
    return isinstance(f, types.FunctionType) and f.__module__ == "__main__" and f.__globals__ is not _ns


def _rebind(f, seen=None):
    """A function defined interactively on the client, made to resolve its globals here.

    As in ipyparallel, names resolve in the engine's namespace; a name the engine lacks is taken
    from what the client sent with the function (its value when the function was sent)."""
    if isinstance(f, functools.partial):
        args = tuple(_deref(a) for a in f.args)
        kwargs = {k: _deref(v) for k, v in f.keywords.items()}
        return functools.partial(_rebind(f.func, seen), *args, **kwargs)
    if not _from_main(f):
        return f
    seen = {} if seen is None else seen
    if id(f) in seen:
        return seen[id(f)]
    g = types.FunctionType(f.__code__, _ns, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    g.__qualname__ = f.__qualname__
    g.__doc__ = f.__doc__
    g.__dict__.update(f.__dict__)
    seen[id(f)] = g
    for name, value in f.__globals__.items():
        if not name.startswith("__") and name not in _ns:
            _ns[name] = _rebind(value, seen)
    return g


def _deref(v):
    return _ns[v.name] if isinstance(v, _Reference) else v


def _unpickle_func(func, bufs):
    if func["python"] != _PYTHON:
        raise RuntimeError(
            "the client runs Python %s and this engine Python %s (%s): functions travel as "
            "bytecode, which differs between versions; use the same Python minor version on both "
            "(`python:` in the cluster spec)" % (func["python"], _PYTHON, sys.executable)
        )
    refs = func["pickle"]
    key = bytes(bufs[refs[0]]) if len(refs) == 1 and len(bufs[refs[0]]) <= _LOADED_SIZE else None
    hit = _loaded.get(key) if key is not None else None
    if hit is not None:
        g, shipped = hit
        for name, value in shipped:
            _ns.setdefault(name, value)
        return g
    f = _loads(refs, bufs)
    shipped = _stateless(f) if key is not None else None
    g = _rebind(f)
    if shipped is not None:
        if len(_loaded) >= 256:
            _loaded.clear()
        _loaded[key] = (g, shipped)
    return g


# Functions sent again and again (`v.apply(f)` in a loop) are unpickled once: a pickle of at
# most _LOADED_SIZE bytes -> the function made of it, if nothing in it can change (see
# _stateless), with the globals it brought.
_loaded = {}
_LOADED_SIZE = 16 * 1024
_ATOMS = (type(None), bool, int, float, complex, str, bytes)


def _stateless(f):
    """The globals an unpickled function brought, as (name, value) pairs, if the function holds
    nothing mutable (no closure, no attributes, defaults and globals atoms or modules); else
    None. Calling such a function again is the same as unpickling it again."""
    if not _from_main(f) or f.__closure__ is not None or f.__kwdefaults__ or f.__dict__:
        return None
    if f.__defaults__ is not None and not all(type(d) in _ATOMS for d in f.__defaults__):
        return None
    shipped = []
    for name, value in f.__globals__.items():
        if name.startswith("__"):
            continue
        if type(value) not in _ATOMS and type(value) is not types.ModuleType:
            return None
        shipped.append((name, value))
    return shipped


def _resolve(func, bufs):
    """A callable from its description: {"expr": source}, {"module", "source", "attr"} or
    {"pickle": [buffer indices], "python": version}."""
    if "pickle" in func:
        return _unpickle_func(func, bufs)
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


def _call(func, item, star, out):
    """One map item: its encoded result, or {"e": error}."""
    try:
        return _encode(func(*item) if star else func(item), out)
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


def _run(task, bufs):
    global _count, _limit, _current
    op = task["op"]
    sys.stdout, sys.stderr = _OUT.text, _ERR.text
    started = time.time()
    rbufs = []
    _cancelled.discard(_ANY)  # an interrupt that came between tasks is for nobody
    try:
        if task["id"] in _cancelled:
            _cancelled.discard(task["id"])
            raise _Cancelled("the task was cancelled before it started")
        _current = task["id"]
        if op == "init":
            os.environ["STARLING_ENGINE_ID"] = str(task["engine"])
            _limit = task.get("max_frame", _limit)
            reply = {"ok": True, "v": None, "python": _PYTHON}
        elif op == "execute":
            _count += 1
            value = _execute(task["code"])
            reply = _encode(value, rbufs)
            reply["ok"] = True
            if value is not None:
                reply["d"] = reply.get("r") or reply.get("o") or _safe_repr(value)
        elif op == "map":
            job = task["job"]
            if "func" in task:
                try:
                    _maps[job] = (_resolve(task["func"], bufs), task.get("star", False))
                except Exception as e:  # noqa: BLE001 - every later chunk fails the same way
                    _maps[job] = (e, False)
                    raise
            func, star = _maps.get(job, (None, False))
            if func is None:
                raise RuntimeError("this kernel does not know the function of job %d" % job)
            if isinstance(func, BaseException):
                raise func
            if "plain" in task:
                items = task["plain"]
                if star:
                    items = [_nested(x) for x in items]
            else:
                items = [_decode(x, bufs) for x in task["items"]]
            reply = {"ok": True, "items": [_call(func, x, star, rbufs) for x in items]}
        elif op == "apply":
            func = _resolve(task["func"], bufs)
            reply = _encode(func(*[_deref(_decode(a, bufs)) for a in task["args"]]), rbufs)
            reply["ok"] = True
        elif op == "push":
            for name, value in task["values"].items():
                _ns[name] = _decode(value, bufs)
            reply = {"ok": True, "v": None}
        elif op == "scatter":
            _ns[task["name"]] = [_decode(x, bufs) for x in task["items"]]
            reply = {"ok": True, "v": None}
        elif op == "pull":
            names = task["names"]
            missing = [n for n in names if n not in _ns]
            if missing:
                raise NameError("name %r is not defined on this engine" % missing[0])
            values = [_ns[n] for n in names]
            reply = _encode(values[0] if len(values) == 1 else values, rbufs)
            reply["ok"] = True
        else:
            reply = {"ok": False, "ename": "KernelError", "evalue": "unknown op %r" % op, "traceback": ""}
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are task errors too
        if os.getpid() != _PID:
            # A process the task forked ran into the kernel's loop (sys.exit in a child): it
            # ends here, silently; the kernel itself carries on.
            os._exit(e.code if isinstance(e, SystemExit) and type(e.code) is int else 0)
        reply = _error(e)
        rbufs = []
    finally:
        if _current is not None:
            _cancelled.discard(_current)
        _current = None
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    if os.getpid() != _PID:
        os._exit(0)
    reply["id"] = task["id"]
    reply["out"], reply["err"] = _take_outputs()
    for job in task.get("forget", ()):
        _maps.pop(job, None)
    reply["n"] = _count
    reply["t0"] = int(started * 1e6)
    reply["t1"] = int(time.time() * 1e6)
    return reply, rbufs


def _read_exact(n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = _R.readinto(view[got:])
        if not k:
            raise EOFError
        got += k
    return buf


def _read_frame():
    (length,) = struct.unpack("<Q", _read_exact(8))
    body = _read_exact(length)
    view = memoryview(body)
    hlen, nbuf = struct.unpack_from("<II", body, 0)
    header = json.loads(view[8 : 8 + hlen].tobytes())
    bufs = []
    at = 8 + hlen
    for _ in range(nbuf):
        (n,) = struct.unpack_from("<Q", body, at)
        bufs.append(view[at + 8 : at + 8 + n])
        at += 8 + n
    return header, bufs


_limit = 64 << 20


def _too_large(header, size):
    return {
        "id": header["id"],
        "ok": False,
        "ename": "ResultTooLarge",
        "evalue": "the result is %d MiB, above the cluster's frame limit of %d MiB (max_frame_mb in the spec); "
        "return less per task, e.g. write large data to files" % (size >> 20, _limit >> 20),
        "traceback": "",
        "n": header.get("n", 0),
        "t0": header.get("t0", 0),
        "t1": header.get("t1", 0),
    }


def _write_frame(header, bufs):
    with _STREAM.lock:
        _write_frame_locked(header, bufs)


def _write_frame_locked(header, bufs):
    # Text that cannot be UTF-8 (lone surrogates in output or messages) becomes '?' rather
    # than a frame the engine cannot read.
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")
    views = [memoryview(b).cast("B") for b in bufs]
    size = len(head) + sum(v.nbytes for v in views)
    if size > _limit and "id" in header:
        # Too large to travel: the task fails, the kernel (and its namespace) lives on.
        _write_frame_locked(_too_large(header, size), [])
        return
    parts = [struct.pack("<QII", 8 + size + 8 * len(views), len(head), len(views)) + head]
    for v in views:
        parts.append(struct.pack("<Q", v.nbytes))
        parts.append(v)
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(_WFD, view) :]


class _Cancelled(Exception):
    pass


def _interrupted_late(task, e):
    # The interrupt for a cancelled task landed while its reply was being made, outside the
    # task's own try: it still gets its one reply, and the kernel goes on.
    global _current
    if os.getpid() != _PID:
        os._exit(0)  # a process the task forked: it never answers for the kernel
    _current = None
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    reply = _error(e)
    out, err = _take_outputs()
    reply.update(id=task["id"], out=out, err=err, n=_count, t0=0, t1=0)
    return reply, []


def main():
    global _STREAM
    signal.signal(signal.SIGINT, _on_sigint)
    _STREAM = _Streamer()
    _write_frame({"ready": os.getpid(), "python": _PYTHON}, [])
    while True:
        try:
            tasks, bufs = _read_frame()
        except EOFError:
            return
        _OUT.start()
        _ERR.start()
        try:
            for task in tasks:
                # One frame per task, written at once: if a task kills the process, the results
                # before it are already out.
                _STREAM.begin(task["id"])
                try:
                    done = _run(task, bufs)
                except KeyboardInterrupt as e:
                    done = _interrupted_late(task, e)
                _write_frame(*done)
        finally:
            _OUT.stop()
            _ERR.stop()


main()
