//! `starling._starling`: the Python binding over starling's Rust client.
//!
//! One implementation of the protocol: every call here goes through `starling::client` (and
//! `starling::provider` for `Cluster`). This layer only converts values and waits: it holds one
//! tokio runtime per process, releases the GIL while it waits, and wakes every
//! [`SIGNAL_CHECK`] to let Ctrl-C raise `KeyboardInterrupt`. The public Python API —
//! ipyparallel's names, pickling, magics — lives in the pure-Python package around it.
//!
//! Values cross as: JSON-shaped Python objects (`None`, `bool`, `int`, `float`, `str`, and lists
//! and dicts of them when they come back from engines), or as a tuple
//! `(pickle: bytes, buffers: list, repr: str)` for anything pickled. A value that an engine
//! could show but not pickle comes back as `(None, None, repr)`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PySlice, PyTuple};
use serde_json::Value as Json;

use starling::client::{AsyncResult, Client, ClientError, DirectView, LoadBalancedView};
use starling::proto::{
    Dependency, EngineId, Func, JobId, JobOptions, Mapper, RemoteError, Targets, Value,
};

/// Large blocks (frames) on huge pages: see `starling::proto::huge`.
#[global_allocator]
static ALLOC: starling::proto::huge::HugePages = starling::proto::huge::HugePages;

/// How often a wait wakes to let Python handle signals (Ctrl-C): well under the half second a
/// user notices, long enough to cost nothing.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// The process's runtime. After `fork` its threads are gone: [`FORKED`] says so in the child.
///
/// Current-thread: whichever thread drives it reads the connections and runs the tasks. A
/// thread that waits for a call drives it itself when no other thread does (see [`block_on`]):
/// the reply wakes that thread straight from the socket, with no hand-over from another
/// thread. A thread of its own ("starling-client") drives it while there is [`Demand`]: work
/// that must go on while no caller waits for it, such as a job whose `AsyncResult` is
/// in Python's hands.
static RUNTIME: OnceLock<std::sync::Arc<tokio::runtime::Runtime>> = OnceLock::new();

/// Set in a child forked from a process that built [`RUNTIME`] (by a `pthread_atfork` handler:
/// no system call per request to compare pids).
static FORKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn in_forked_child() {
    FORKED.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    let rt = RUNTIME.get_or_init(|| {
        // SAFETY: registers a handler that only stores to an atomic, which is async-signal-safe
        // as a fork handler must be.
        unsafe { libc::pthread_atfork(None, None, Some(in_forked_child)) };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime can be built");
        let rt = std::sync::Arc::new(rt);
        let driver = rt.clone();
        std::thread::Builder::new()
            .name("starling-client".into())
            .spawn(move || Demand::serve(&driver))
            .expect("a thread for the client's runtime");
        rt
    });
    if FORKED.load(std::sync::atomic::Ordering::Relaxed) {
        Err(PyRuntimeError::new_err(
            "a starling Client cannot be used in a process forked from the one that created it; create a new Client in the child",
        ))
    } else {
        Ok(rt)
    }
}

/// Work that needs the runtime driven while perhaps no caller waits for it: a job in flight
/// whose `AsyncResult` Python holds, a done-callback to call, a connection closing, what a call
/// given up midway (Ctrl-C) started and is still coming back, a caller waiting while another
/// thread drives. One count for all; the "starling-client" thread
/// drives the runtime while it is above zero, and sleeps (off the runtime) at zero, so that a
/// caller can drive it instead.
struct Demand;

static DEMAND: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Whether the "starling-client" thread drives the runtime now.
static SERVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static WANTED: std::sync::Mutex<()> = std::sync::Mutex::new(());
static WANTED_CV: std::sync::Condvar = std::sync::Condvar::new();
/// Notified when the count falls to zero.
static SATED: tokio::sync::Notify = tokio::sync::Notify::const_new();

impl Demand {
    /// One more piece of work; held until the guard drops.
    fn hold() -> DemandGuard {
        use std::sync::atomic::Ordering::SeqCst;
        DEMAND.fetch_add(1, SeqCst);
        let _locked = WANTED.lock().unwrap_or_else(|e| e.into_inner());
        WANTED_CV.notify_one();
        DemandGuard
    }

    /// Holds demand until `done` resolves (run on the runtime).
    fn until(rt: &tokio::runtime::Runtime, done: impl Future<Output = ()> + Send + 'static) {
        let guard = Self::hold();
        rt.spawn(async move {
            done.await;
            drop(guard);
        });
    }

    /// The "starling-client" thread: drives the runtime while there is demand.
    fn serve(rt: &tokio::runtime::Runtime) {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            {
                let mut locked = WANTED.lock().unwrap_or_else(|e| e.into_inner());
                while DEMAND.load(SeqCst) == 0 {
                    locked = WANTED_CV.wait(locked).unwrap_or_else(|e| e.into_inner());
                }
            }
            SERVING.store(true, SeqCst);
            rt.block_on(async {
                while DEMAND.load(SeqCst) != 0 {
                    SATED.notified().await;
                }
            });
            SERVING.store(false, SeqCst);
        }
    }
}

struct DemandGuard;

impl Drop for DemandGuard {
    fn drop(&mut self) {
        if DEMAND.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            SATED.notify_one();
        }
    }
}

/// Wakes the thread that waits in [`block_on`].
struct ThreadWaker(std::thread::Thread);

impl std::task::Wake for ThreadWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `fut` to completion with the GIL released, checking for signals every
/// [`SIGNAL_CHECK`]; a `KeyboardInterrupt` leaves whatever `fut` was doing to carry on
/// (a submitted job keeps running on the cluster; a client's calls see to it that its
/// results are still read, see [`NativeClient::block_on`]).
///
/// When no thread drives the runtime, this one does, parked in the runtime's own wait for the
/// socket. Otherwise (another thread drives, or this one runs inside the runtime, as a
/// done-callback does) it polls the future in place and parks between polls, holding
/// [`Demand`] until it is done so that someone drives; the signal check is the park's timeout,
/// so waiting costs no timer in the runtime, whose driver another thread would have to
/// re-arm.
fn block_on<T, F>(py: Python<'_>, fut: F) -> PyResult<T>
where
    F: Future<Output = T> + Send,
    T: Send,
{
    use std::sync::atomic::Ordering::SeqCst;
    let rt = runtime()?;
    let mut fut = std::pin::pin!(fut);
    // Held from the first wait that finds the runtime taken until the end: a caller does not
    // make the background thread stop and start again at every signal check.
    let mut demand = None;
    loop {
        let free = demand.is_none()
            && DEMAND.load(SeqCst) == 0
            && !SERVING.load(SeqCst)
            && tokio::runtime::Handle::try_current().is_err();
        let step = if free {
            py.detach(|| {
                rt.block_on(async { tokio::time::timeout(SIGNAL_CHECK, fut.as_mut()).await.ok() })
            })
        } else {
            demand.get_or_insert_with(Demand::hold);
            py.detach(|| {
                let _context = rt.enter();
                let waker = std::task::Waker::from(std::sync::Arc::new(ThreadWaker(
                    std::thread::current(),
                )));
                let mut cx = std::task::Context::from_waker(&waker);
                let deadline = std::time::Instant::now() + SIGNAL_CHECK;
                loop {
                    if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                        return Some(v);
                    }
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    std::thread::park_timeout(left);
                }
            })
        };
        match step {
            Some(v) => return Ok(v),
            None => py.check_signals()?,
        }
    }
}

fn client_err(e: ClientError) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

fn seconds(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t < 0.0 => Ok(None),
        Some(t) if t.is_finite() => Ok(Some(Duration::from_secs_f64(t))),
        Some(t) => Err(PyValueError::new_err(format!(
            "timeout must be a number of seconds, not {t}"
        ))),
    }
}

// ---- values -------------------------------------------------------------------------------

/// A large buffer in this process's own memory (see `starling::proto::huge`: on huge pages,
/// and a freed block is reused), shown to Python as a writable `ctypes` array of bytes that
/// keeps it alive. Python's allocator would give each large buffer fresh pages, which the
/// kernel faults in and zeroes on first touch: per 100 MB pulled, that cost more than the copy
/// into it. (The stable ABI this wheel is built for has no buffer protocol of its own before
/// Python 3.11, so the `ctypes` array exports the memory.)
#[pyclass(frozen)]
struct NativeBuffer {
    at: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the block is this object's alone and freed once, in `drop`. Python writes it only
// through its `ctypes` array; Rust reads it only through `HeldNative`, once the pickler has
// filled it and nothing writes it any more.
unsafe impl Send for NativeBuffer {}
unsafe impl Sync for NativeBuffer {}

impl NativeBuffer {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::array::<u8>(len).expect("a buffer's size fits a layout")
    }
}

impl Drop for NativeBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `native_buffer` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.at.as_ptr(), Self::layout(self.len)) }
    }
}

/// The attribute of a [`native_buffer`]'s `ctypes` array that holds its memory.
const NATIVE: &str = "_starling_memory";

/// A [`NativeBuffer`] of `n` (> 0) bytes, as a writable `ctypes` array. Its contents are
/// unspecified until written: the caller fills it before anyone else sees it.
fn native_buffer(py: Python<'_>, n: usize) -> PyResult<(Bound<'_, PyAny>, *mut u8)> {
    static UBYTE: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
    if n == 0 || isize::try_from(n).is_err() {
        return Err(PyValueError::new_err(format!("no buffer of {n} bytes")));
    }
    // SAFETY: a layout of n > 0 bytes.
    let at = std::ptr::NonNull::new(unsafe { std::alloc::alloc(NativeBuffer::layout(n)) })
        .ok_or_else(|| {
            pyo3::exceptions::PyMemoryError::new_err(format!("no memory for a buffer of {n} bytes"))
        })?;
    let memory = Bound::new(py, NativeBuffer { at, len: n })?;
    let ubyte = UBYTE.get_or_try_init(py, || -> PyResult<_> {
        Ok(py.import("ctypes")?.getattr("c_ubyte")?.unbind())
    })?;
    let array = ubyte
        .bind(py)
        .mul(n)?
        .call_method1("from_address", (at.as_ptr() as usize,))?;
    array.setattr(NATIVE, memory)?;
    Ok((array, at.as_ptr()))
}

/// A [`NativeBuffer`] from [`large_buffer`], held as [`Bytes`] without a copy: the pickler
/// filled it, and nothing writes it any more.
struct HeldNative(Py<NativeBuffer>);

impl AsRef<[u8]> for HeldNative {
    fn as_ref(&self) -> &[u8] {
        let b = self.0.get();
        // SAFETY: `len` bytes at `at`, alive while `self.0` is, filled before it was held.
        unsafe { std::slice::from_raw_parts(b.at.as_ptr(), b.len) }
    }
}

/// One out-of-band buffer for the wire: `bytes` are shared as they are; a buffer from
/// [`large_buffer`] is taken over whole.
fn buffer_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if !obj.is_instance_of::<PyBytes>() {
        if let Ok(memory) = obj.getattr(NATIVE) {
            let memory = memory.cast_into::<NativeBuffer>()?;
            return Ok(Bytes::from_owner(HeldNative(memory.unbind())));
        }
    }
    Ok(obj.extract::<Bytes>()?)
}

/// A writable buffer of `n` bytes in native memory (see [`NativeBuffer`]), for the pickler to
/// copy a large out-of-band buffer into; the client then sends it as it is.
#[pyfunction]
fn large_buffer(py: Python<'_>, n: usize) -> PyResult<Bound<'_, PyAny>> {
    native_buffer(py, n).map(|(obj, _)| obj)
}

/// A new `bytes` of `n` bytes, not yet filled, its buffer advised to use huge pages: Python's
/// allocator leaves a block that size untouched, so whatever fills it first faults it in
/// 2 MiB pages. The buffer is the caller's to fill before anyone else sees the object.
fn advised_python_bytes(py: Python<'_>, n: usize) -> PyResult<(Bound<'_, PyAny>, *mut u8)> {
    let len = pyo3::ffi::Py_ssize_t::try_from(n)
        .map_err(|_| PyValueError::new_err("a buffer too large for Python"))?;
    // SAFETY: given no data, the constructor returns a new object of `len` bytes (or NULL
    // with an exception set, which `from_owned_ptr_or_err` turns into an error), whose buffer
    // `PyBytes_AsString` returns.
    unsafe {
        let obj = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), len);
        let obj = Bound::from_owned_ptr_or_err(py, obj)?;
        let at = pyo3::ffi::PyBytes_AsString(obj.as_ptr()).cast::<u8>();
        if at.is_null() {
            return Err(PyErr::fetch(py));
        }
        starling::proto::huge::advise(at, n);
        Ok((obj, at))
    }
}

fn value_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if let Ok(t) = obj.cast::<PyTuple>() {
        if t.len() == 3 {
            let bytes: Bytes = t.get_item(0)?.extract()?;
            let buffers = t
                .get_item(1)?
                .try_iter()?
                .map(|b| buffer_from_py(&b?))
                .collect::<PyResult<Vec<Bytes>>>()?;
            let repr: String = t.get_item(2)?.extract()?;
            return Ok(Value::Pickle(Box::new(starling::proto::Pickled {
                repr,
                bytes,
                buffers,
                json: None,
            })));
        }
    }
    Ok(Value::Json(json_from_py(obj)?))
}

fn values_from_py(objs: &[Bound<'_, PyAny>]) -> PyResult<Vec<Value>> {
    objs.iter().map(value_from_py).collect()
}

fn json_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Json> {
    if obj.is_none() {
        return Ok(Json::Null);
    }
    if let Ok(b) = obj.cast::<pyo3::types::PyBool>() {
        return Ok(Json::Bool(b.is_true()));
    }
    if let Ok(i) = obj.extract::<i64>() {
        return Ok(Json::from(i));
    }
    if let Ok(u) = obj.extract::<u64>() {
        return Ok(Json::from(u));
    }
    if let Ok(f) = obj.cast::<pyo3::types::PyFloat>() {
        return Ok(serde_json::Number::from_f64(f.value()).map_or(Json::Null, Json::Number));
    }
    if let Ok(s) = obj.extract::<String>() {
        return Ok(Json::String(s));
    }
    Err(PyValueError::new_err(format!(
        "cannot send {} as it is: pickle it first",
        obj.get_type().name()?
    )))
}

fn json_to_py<'py>(py: Python<'py>, v: &Json) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Json::Null => py.None().into_bound(py),
        Json::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Json::String(s) => s.into_pyobject(py)?.into_any(),
        Json::Array(items) => {
            let list = PyList::empty(py);
            for x in items {
                list.append(json_to_py(py, x)?)?;
            }
            list.into_any()
        }
        Json::Object(map) => {
            let d = PyDict::new(py);
            for (k, x) in map {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

fn value_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    match v {
        Value::Json(j) => json_to_py(py, j),
        Value::Pickle(p) => {
            let starling::proto::Pickled {
                repr,
                bytes,
                buffers,
                ..
            } = &**p;
            // Buffers are writable: a NumPy array unpickled from one is writable.
            let bufs = PyList::empty(py);
            for b in buffers {
                bufs.append(new_python_buffer(py, b, true)?)?;
            }
            Ok(PyTuple::new(
                py,
                [
                    new_python_buffer(py, bytes, false)?,
                    bufs.into_any(),
                    repr.into_pyobject(py)?.into_any(),
                ],
            )?
            .into_any())
        }
        Value::Opaque { repr } => Ok(PyTuple::new(
            py,
            [
                py.None().into_bound(py),
                py.None().into_bound(py),
                repr.into_pyobject(py)?.into_any(),
            ],
        )?
        .into_any()),
    }
}

/// `data` as a new `bytearray` (`mutable`) or `bytes`; a large one in native memory
/// ([`NativeBuffer`], writable) or on huge pages (`bytes`).
fn new_python_buffer<'py>(
    py: Python<'py>,
    data: &[u8],
    mutable: bool,
) -> PyResult<Bound<'py, PyAny>> {
    if data.len() < starling::proto::huge::HUGE_FROM {
        return Ok(if mutable {
            PyByteArray::new(py, data).into_any()
        } else {
            PyBytes::new(py, data).into_any()
        });
    }
    let (obj, at) = if mutable {
        native_buffer(py, data.len())?
    } else {
        advised_python_bytes(py, data.len())?
    };
    // SAFETY: `at` is the new object's buffer of `data.len()` bytes, which nobody else has yet.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), at, data.len()) };
    Ok(obj)
}

fn error_to_py<'py>(py: Python<'py>, e: &RemoteError) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(py, [&e.ename, &e.evalue, &e.traceback])
}

/// A callable pickled by the Python layer: `(pickle, buffers, python_version)`.
fn func_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Func> {
    if let Ok(expr) = obj.extract::<String>() {
        return Ok(Func::Expr(expr));
    }
    let (bytes, buffers, python): (Bytes, Vec<Bytes>, String) = obj.extract()?;
    Ok(Func::Pickle {
        bytes,
        buffers,
        python,
    })
}

/// Scheduler options from a dict: `after` and `follow` as `(jobs, all, success, failure)`,
/// `retries`, `timeout` (seconds), `label`.
fn options_from_py(opts: Option<&Bound<'_, PyDict>>) -> PyResult<JobOptions> {
    let mut o = JobOptions::default();
    let Some(d) = opts else { return Ok(o) };
    let dep = |key: &str| -> PyResult<Option<Dependency>> {
        match d.get_item(key)? {
            Some(v) if !v.is_none() => {
                let (jobs, all, success, failure): (Vec<u64>, bool, bool, bool) = v.extract()?;
                Ok(Some(Dependency {
                    jobs: jobs.into_iter().map(JobId).collect(),
                    all,
                    success,
                    failure,
                }))
            }
            _ => Ok(None),
        }
    };
    o.after = dep("after")?;
    o.follow = dep("follow")?;
    if let Some(t) = d.get_item("engines")?.filter(|t| !t.is_none()) {
        o.engines = Some(engines_from_py(&t)?);
    }
    if let Some(r) = d.get_item("retries")? {
        o.retries = r.extract::<Option<u32>>()?.unwrap_or(0);
    }
    if let Some(t) = d.get_item("timeout")? {
        if let Some(secs) = t.extract::<Option<f64>>()? {
            if !(secs > 0.0 && secs < 1e9) {
                return Err(PyValueError::new_err(format!(
                    "timeout must be a positive number of seconds, not {secs}"
                )));
            }
            o.timeout_ms = Some(((secs * 1000.0).round() as u64).max(1));
        }
    }
    if let Some(l) = d.get_item("label")? {
        o.label = l.extract()?;
    }
    Ok(o)
}

/// A load-balanced view's targets as Python gives them: an id (a negative one counts from the
/// end), a list of ids, or a slice of the ids. The controller resolves them, or says which
/// engine does not exist.
fn engines_from_py(t: &Bound<'_, PyAny>) -> PyResult<Targets> {
    if let Ok(s) = t.cast::<PySlice>() {
        let part = |name: &str| -> PyResult<Option<i64>> { s.getattr(name)?.extract() };
        let step = part("step")?;
        if step == Some(0) {
            return Err(PyValueError::new_err(
                "a slice of targets cannot have step 0",
            ));
        }
        return Ok(Targets::Slice {
            start: part("start")?,
            stop: part("stop")?,
            step,
        });
    }
    if let Ok(id) = t.extract::<i64>() {
        return Ok(match u32::try_from(id) {
            Ok(id) => Targets::Ids(vec![EngineId(id)]),
            // -1 is the last engine: the slice -1: (and -2 the slice -2:-1).
            Err(_) => Targets::Slice {
                start: Some(id),
                stop: (id < -1).then_some(id + 1),
                step: None,
            },
        });
    }
    let ids: Vec<u32> = t.extract()?;
    Ok(Targets::Ids(ids.into_iter().map(EngineId).collect()))
}

fn targets_from_py(targets: Option<Vec<u32>>) -> Targets {
    match targets {
        None => Targets::All,
        Some(ids) => Targets::Ids(ids.into_iter().map(EngineId).collect()),
    }
}

// ---- the client ---------------------------------------------------------------------------

/// A connection to one cluster's controller.
#[pyclass(module = "starling._starling", frozen)]
struct NativeClient {
    client: Client,
    path: PathBuf,
}

/// The most a dropped client's connection is driven while it closes: a controller that never
/// closes its side (stopped, or gone without a word) does not keep the runtime busy for good.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

impl Drop for NativeClient {
    /// The connection closes on the runtime (a TLS close, then the socket's): it is driven
    /// until then.
    fn drop(&mut self) {
        if let Ok(rt) = runtime() {
            let closed = self.client.closed();
            Demand::until(rt, async move {
                let _ = tokio::time::timeout(CLOSE_WAIT, closed).await;
            });
        }
    }
}

/// Connects: `url_file` (a connection file), else the cluster named `cluster`, else
/// `STARLING_CLUSTER`, else the only cluster there is.
#[pyfunction]
#[pyo3(signature = (url_file=None, cluster=None, timeout=None))]
fn connect(
    py: Python<'_>,
    url_file: Option<PathBuf>,
    cluster: Option<String>,
    timeout: Option<f64>,
) -> PyResult<NativeClient> {
    let path = starling::client::connection::find(cluster.as_deref(), url_file.as_deref())
        .map_err(client_err)?;
    let limit = seconds(timeout)?.unwrap_or(Duration::from_secs(30));
    let p = path.clone();
    let client = block_on(py, async move {
        match tokio::time::timeout(limit, Client::connect(&p)).await {
            Ok(r) => r.map_err(client_err),
            Err(_) => Err(PyTimeoutError::new_err(format!(
                "no answer from the controller in {} s (connection file {})",
                limit.as_secs_f64(),
                p.display()
            ))),
        }
    })??;
    Ok(NativeClient { client, path })
}

#[pymethods]
impl NativeClient {
    #[getter]
    fn cluster(&self) -> String {
        self.client.cluster().to_string()
    }

    #[getter]
    fn connection_file(&self) -> PathBuf {
        self.path.clone()
    }

    fn ids(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        let c = self.client.clone();
        let ids = self
            .block_on(py, async move { c.ids().await })?
            .map_err(client_err)?;
        Ok(ids.into_iter().map(|e| e.0).collect())
    }

    #[pyo3(signature = (n, timeout=None))]
    fn wait_for_engines(&self, py: Python<'_>, n: u32, timeout: Option<f64>) -> PyResult<Vec<u32>> {
        let c = self.client.clone();
        let t = seconds(timeout)?.unwrap_or(Duration::from_secs(3600 * 24 * 365));
        let ids = self.block_on(py, async move { c.wait_for_engines(n, t).await })?;
        match ids {
            Ok(ids) => Ok(ids.into_iter().map(|e| e.0).collect()),
            Err(ClientError::Controller(m)) => Err(PyTimeoutError::new_err(m)),
            Err(e) => Err(client_err(e)),
        }
    }

    /// The cluster's status as JSON text.
    fn status(&self, py: Python<'_>) -> PyResult<String> {
        let c = self.client.clone();
        let s = self
            .block_on(py, async move { c.status().await })?
            .map_err(client_err)?;
        serde_json::to_string(&s).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    #[pyo3(signature = (targets, code, options=None, *, wait=false))]
    fn execute(
        &self,
        py: Python<'_>,
        targets: Option<Vec<u32>>,
        code: String,
        options: Option<&Bound<'_, PyDict>>,
        wait: bool,
    ) -> PyResult<NativeResult> {
        let v = self
            .direct(targets, wait)
            .options(options_from_py(options)?);
        self.submit(py, async move { v.execute(&code).await })
    }

    /// `func(*args)`: on each of `targets`, or `balanced` on whichever engine is free first.
    /// With `wait` (here and in every call that submits a job), returns once the job has
    /// ended: a call that blocks waits in the same native call as it submits.
    #[pyo3(signature = (func, args, *, targets=None, balanced=false, options=None, wait=false))]
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        py: Python<'_>,
        func: &Bound<'_, PyAny>,
        args: Vec<Bound<'_, PyAny>>,
        targets: Option<Vec<u32>>,
        balanced: bool,
        options: Option<&Bound<'_, PyDict>>,
        wait: bool,
    ) -> PyResult<NativeResult> {
        let func = func_from_py(func)?;
        let args = values_from_py(&args)?;
        let options = options_from_py(options)?;
        if balanced {
            let lb = self.load_balanced(wait).options(options);
            self.submit(py, async move { lb.apply(func, args).await })
        } else {
            let v = self.direct(targets, wait).options(options);
            self.submit(py, async move { v.apply(func, args).await })
        }
    }

    /// A map: load-balanced (`targets` None and `balanced`), or one contiguous chunk per
    /// target. With `star`, each item is an argument tuple.
    #[pyo3(signature = (func, items, *, balanced, targets=None, star=false, chunksize=None, options=None, wait=false))]
    #[allow(clippy::too_many_arguments)]
    fn map(
        &self,
        py: Python<'_>,
        func: &Bound<'_, PyAny>,
        items: Vec<Bound<'_, PyAny>>,
        balanced: bool,
        targets: Option<Vec<u32>>,
        star: bool,
        chunksize: Option<u32>,
        options: Option<&Bound<'_, PyDict>>,
        wait: bool,
    ) -> PyResult<NativeResult> {
        let options = options_from_py(options)?;
        let func = func_from_py(func)?;
        let mapper = if star {
            Mapper::Star(func)
        } else {
            Mapper::Python(func)
        };
        let items = values_from_py(&items)?;
        if balanced {
            let mut lb = self.load_balanced(wait).options(options);
            if let Some(c) = chunksize {
                lb = lb.chunksize(c);
            }
            self.submit(py, async move { lb.map_with(mapper, items).await })
        } else {
            let v = self.direct(targets, wait).options(options);
            self.submit(py, async move { v.map_with(mapper, items).await })
        }
    }

    #[pyo3(signature = (targets, values, *, wait=false))]
    fn push(
        &self,
        py: Python<'_>,
        targets: Option<Vec<u32>>,
        values: Vec<(String, Bound<'_, PyAny>)>,
        wait: bool,
    ) -> PyResult<NativeResult> {
        let values = values
            .iter()
            .map(|(k, v)| Ok((k.clone(), value_from_py(v)?)))
            .collect::<PyResult<Vec<_>>>()?;
        let v = self.direct(targets, wait);
        self.submit(py, async move { v.push(values).await })
    }

    #[pyo3(signature = (targets, names, *, wait=false))]
    fn pull(
        &self,
        py: Python<'_>,
        targets: Option<Vec<u32>>,
        names: Vec<String>,
        wait: bool,
    ) -> PyResult<NativeResult> {
        let v = self.direct(targets, wait);
        self.submit(py, async move {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            v.pull(&names).await
        })
    }

    #[pyo3(signature = (targets, name, items, *, wait=false))]
    fn scatter(
        &self,
        py: Python<'_>,
        targets: Option<Vec<u32>>,
        name: String,
        items: Vec<Bound<'_, PyAny>>,
        wait: bool,
    ) -> PyResult<NativeResult> {
        let items = values_from_py(&items)?;
        let v = self.direct(targets, wait);
        self.submit(py, async move { v.scatter(&name, items).await })
    }

    /// Re-attaches to any job by id, also one another client submitted.
    fn result(&self, py: Python<'_>, job: u64) -> PyResult<NativeResult> {
        let c = self.client.clone();
        self.submit(py, async move { c.result(JobId(job)).await })
    }

    /// Drops a job's tasks that have not started; with `interrupt`, its running ones too.
    #[pyo3(signature = (job, interrupt=false))]
    fn abort(&self, py: Python<'_>, job: u64, interrupt: bool) -> PyResult<()> {
        let c = self.client.clone();
        self.block_on(py, async move { c.abort(JobId(job), interrupt).await })?
            .map_err(client_err)
    }

    /// SIGINT to the kernels of `targets`; returns the engines interrupted.
    fn interrupt(&self, py: Python<'_>, targets: Option<Vec<u32>>) -> PyResult<Vec<u32>> {
        let c = self.client.clone();
        let t = targets_from_py(targets);
        let ids = self
            .block_on(py, async move { c.interrupt(t).await })?
            .map_err(client_err)?;
        Ok(ids.into_iter().map(|e| e.0).collect())
    }

    /// The task store's jobs matching a `db_query` dict given as JSON text, as JSON text.
    fn history(&self, py: Python<'_>, query: String, limit: u32) -> PyResult<String> {
        let query: Json = serde_json::from_str(&query)
            .map_err(|e| PyValueError::new_err(format!("the query is not JSON: {e}")))?;
        let c = self.client.clone();
        let records = self
            .block_on(py, async move { c.history(&query, limit).await })?
            .map_err(client_err)?;
        serde_json::to_string(&records).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// Submits job `job` again, as a new job.
    fn resubmit(&self, py: Python<'_>, job: u64) -> PyResult<NativeResult> {
        let c = self.client.clone();
        self.submit(py, async move { c.resubmit(JobId(job)).await })
    }

    /// Deletes finished jobs matching a `db_query` dict (JSON text); returns how many.
    fn purge(&self, py: Python<'_>, query: String) -> PyResult<u64> {
        let query: Json = serde_json::from_str(&query)
            .map_err(|e| PyValueError::new_err(format!("the query is not JSON: {e}")))?;
        let c = self.client.clone();
        self.block_on(py, async move { c.purge(&query).await })?
            .map_err(client_err)
    }

    /// Stops the cluster's engines and controller.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        let c = self.client.clone();
        self.block_on(py, async move { c.shutdown().await })?
            .map_err(client_err)
    }
}

impl NativeClient {
    /// A view on `targets` whose submissions return once their job has ended if `wait`.
    fn direct(&self, targets: Option<Vec<u32>>, wait: bool) -> DirectView {
        let v = self.client.direct(targets_from_py(targets));
        if wait {
            v.returning_when_done()
        } else {
            v
        }
    }

    /// The load-balanced view, returning once the job has ended if `wait`.
    fn load_balanced(&self, wait: bool) -> LoadBalancedView {
        let lb = self.client.load_balanced();
        if wait {
            lb.returning_when_done()
        } else {
            lb
        }
    }

    /// [`block_on`] for this client's calls. A wait given up midway (Ctrl-C) leaves requests and
    /// jobs in flight whose replies and results still come: the runtime is driven until they
    /// have, so that they do not pile up at the controller, which cuts a client that does not
    /// read.
    fn block_on<T, F>(&self, py: Python<'_>, fut: F) -> PyResult<T>
    where
        F: Future<Output = T> + Send,
        T: Send,
    {
        block_on(py, fut).inspect_err(|_| {
            if let Ok(rt) = runtime() {
                Demand::until(rt, self.client.settled());
            }
        })
    }

    fn submit<F>(&self, py: Python<'_>, fut: F) -> PyResult<NativeResult>
    where
        F: Future<Output = Result<AsyncResult, ClientError>> + Send,
    {
        let ar = self.block_on(py, fut)?.map_err(client_err)?;
        if !ar.ended() {
            // Python holds the result and reads its progress without waiting: the runtime
            // must take in its results meanwhile.
            let watched = ar.clone();
            Demand::until(runtime()?, async move {
                let _ = watched.wait(None).await;
            });
        }
        Ok(NativeResult { ar })
    }
}

// ---- results ------------------------------------------------------------------------------

/// A job in flight or done.
#[pyclass(module = "starling._starling", frozen)]
struct NativeResult {
    ar: AsyncResult,
}

#[pymethods]
impl NativeResult {
    #[getter]
    fn job(&self) -> u64 {
        self.ar.job_id().0
    }

    /// `execute`, `apply`, `map`, …
    #[getter]
    fn kind(&self) -> String {
        format!("{:?}", self.ar.kind()).to_lowercase()
    }

    /// When the controller accepted the job, in seconds since the epoch.
    #[getter]
    fn submitted(&self) -> f64 {
        self.ar.submitted() as f64 / 1e6
    }

    /// The engines of the job's tasks known up front (empty for a load-balanced map).
    #[getter]
    fn engines(&self) -> Vec<u32> {
        self.ar.engines().into_iter().map(|e| e.0).collect()
    }

    fn ready(&self) -> bool {
        self.ar.ready()
    }

    /// Whether waiting is over: done, or the connection was lost before.
    fn ended(&self) -> bool {
        self.ar.ended()
    }

    /// `(done, total)` slots.
    fn progress(&self) -> (usize, usize) {
        self.ar.progress()
    }

    fn elapsed(&self) -> f64 {
        self.ar.elapsed().as_secs_f64()
    }

    fn serial_time(&self) -> f64 {
        self.ar.serial_time().as_secs_f64()
    }

    /// Waits (GIL released, Ctrl-C honoured) until done or `timeout` seconds; whether done.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let t = seconds(timeout)?;
        let ar = self.ar.clone();
        block_on(py, async move { ar.wait(t).await })?.map_err(client_err)
    }

    /// Waits until at least `n` slots are filled, or `timeout`; whether they are.
    #[pyo3(signature = (n, timeout=None))]
    fn wait_count(&self, py: Python<'_>, n: usize, timeout: Option<f64>) -> PyResult<bool> {
        let t = seconds(timeout)?;
        let ar = self.ar.clone();
        block_on(py, async move { ar.wait_count(n, t).await })?.map_err(client_err)
    }

    /// What running tasks have written, from the `from`-th piece on, as
    /// `(engine, task, stdout, stderr)`: each piece follows the last of its task.
    fn streamed(&self, from: usize) -> Vec<(Option<u32>, u64, String, String)> {
        self.ar
            .streamed(from)
            .into_iter()
            .map(|o| (engine_to_py(o.engine), o.task.0, o.stdout, o.stderr))
            .collect()
    }

    /// Slot indices in the order they were filled.
    fn completion_order(&self) -> Vec<usize> {
        self.ar.completion_order()
    }

    /// One slot: `None` while pending, else `(ok, value or (ename, evalue, traceback), engine)`.
    fn slot<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Option<Bound<'py, PyTuple>>> {
        self.ar
            .slot(index)
            .map(|(engine, v)| slot_to_py(py, engine, &v))
            .transpose()
    }

    /// Every slot, as [`Self::slot`].
    fn slots<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for s in self.ar.slots() {
            match s {
                None => out.append(py.None())?,
                Some((engine, v)) => out.append(slot_to_py(py, engine, &v)?)?,
            }
        }
        Ok(out)
    }

    /// The finished tasks, in the order they finished: dicts with `task`, `engine_id`,
    /// `first`, `stdout`, `stderr`, `execution_count`, `started`, `completed` (seconds since
    /// the epoch), `status` (`ok` or `error`), `display` (the `repr` of a final expression).
    fn tasks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for r in self.ar.results() {
            let d = PyDict::new(py);
            d.set_item("task", r.task.0)?;
            d.set_item("engine_id", engine_to_py(r.engine))?;
            d.set_item("first", r.first)?;
            d.set_item("stdout", &r.stdout)?;
            d.set_item("stderr", &r.stderr)?;
            d.set_item("execution_count", r.execution_count)?;
            d.set_item("attempts", r.attempts)?;
            d.set_item("started", r.started as f64 / 1e6)?;
            d.set_item("completed", r.completed as f64 / 1e6)?;
            let (status, display) = match &r.outcome {
                starling::proto::Outcome::Ok { display, .. } => ("ok", display.clone()),
                starling::proto::Outcome::Err(_) => ("error", None),
                starling::proto::Outcome::Items(items) => (
                    if items.iter().all(Result::is_ok) {
                        "ok"
                    } else {
                        "error"
                    },
                    None,
                ),
            };
            d.set_item("status", status)?;
            d.set_item("display", display)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Calls `callback()` from a background thread once the job is done (or its connection
    /// is lost): what makes the Python `AsyncResult` a `concurrent.futures.Future`.
    fn on_done(&self, callback: Py<PyAny>) -> PyResult<()> {
        let ar = self.ar.clone();
        Demand::until(runtime()?, async move {
            let _ = ar.wait(None).await;
            // Off the runtime's threads: the callback may block on Python's GIL for long.
            drop(tokio::task::spawn_blocking(move || {
                Python::attach(|py| {
                    if let Err(e) = callback.call0(py) {
                        e.print(py);
                    }
                });
            }));
        });
        Ok(())
    }
}

fn slot_to_py<'py>(
    py: Python<'py>,
    engine: EngineId,
    v: &Result<Value, RemoteError>,
) -> PyResult<Bound<'py, PyTuple>> {
    let (ok, payload) = match v {
        Ok(value) => (true, value_to_py(py, value)?),
        Err(e) => (false, error_to_py(py, e)?.into_any()),
    };
    PyTuple::new(
        py,
        [
            ok.into_pyobject(py)?.to_owned().into_any(),
            payload,
            engine_to_py(engine).into_pyobject(py)?.into_any(),
        ],
    )
}

/// An engine id, or `None` for a task that never ran on one.
fn engine_to_py(engine: EngineId) -> Option<u32> {
    (engine != EngineId::NONE).then_some(engine.0)
}

// ---- clusters -----------------------------------------------------------------------------

/// Starts a cluster as `starling up` does; returns `(name, connection_file, engine_ids,
/// seconds)`.
#[pyfunction]
#[pyo3(signature = (spec=None, n=None, name=None, python=None, mpi=false))]
fn up(
    py: Python<'_>,
    spec: Option<PathBuf>,
    n: Option<u32>,
    name: Option<String>,
    python: Option<String>,
    mpi: bool,
) -> PyResult<(String, PathBuf, Vec<u32>, f64)> {
    let spec = starling::spec::for_up(&starling::spec::UpOptions {
        file: spec.as_deref(),
        local: false,
        name: name.as_deref(),
        engines: n.map(starling::spec::Count::N),
        python: python.as_deref(),
        mpi,
    })
    .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let cluster = spec.name.clone();
    // `up` runs on a thread of its own (its future is not `Send`); Ctrl-C here cancels it
    // there and takes down what it had started, as `starling up` does on Ctrl-C.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime can be built");
        rt.block_on(async move {
            let progress = starling::bootstrap::Progress::new();
            tokio::select! {
                r = starling::provider::up(&spec, &progress) => {
                    let _ = done_tx.send(r);
                }
                _ = cancel_rx => {
                    let _ = starling::provider::down(&spec.name, &starling::provider::Hints::default()).await;
                }
            }
        });
    });
    let launched = match block_on(py, done_rx) {
        Ok(Ok(r)) => r.map_err(|e| PyRuntimeError::new_err(e.to_string()))?,
        Ok(Err(_)) => {
            return Err(PyRuntimeError::new_err(format!(
                "starting cluster '{cluster}' failed without a word; `starling down {cluster}` removes what exists of it"
            )))
        }
        Err(e) => {
            let _ = cancel_tx.send(());
            py.detach(|| worker.join()).ok();
            return Err(e);
        }
    };
    Ok((
        launched.cluster,
        launched.connection,
        launched.engines.into_iter().map(|e| e.0).collect(),
        launched.elapsed.as_secs_f64(),
    ))
}

/// Takes a cluster down as `starling down` does; returns what was removed, in words.
#[pyfunction]
fn down(py: Python<'_>, name: String) -> PyResult<String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime can be built");
        let _ = tx.send(rt.block_on(starling::provider::down(
            &name,
            &starling::provider::Hints::default(),
        )));
    });
    let t = block_on(py, rx)?
        .map_err(|_| PyRuntimeError::new_err("taking the cluster down failed without a word"))?
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok(if t.found {
        format!(
            "cluster '{}' is down: stopped {} processes{}",
            t.cluster,
            t.stopped,
            if t.removed.is_empty() {
                String::new()
            } else {
                format!("; removed {}", t.removed.join(", "))
            }
        )
    } else {
        format!("cluster '{}' does not exist; nothing to do", t.cluster)
    })
}

#[pymodule]
fn _starling(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeClient>()?;
    m.add_class::<NativeResult>()?;
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    m.add_function(wrap_pyfunction!(up, m)?)?;
    m.add_function(wrap_pyfunction!(down, m)?)?;
    m.add_function(wrap_pyfunction!(large_buffer, m)?)?;
    m.add("LARGE_BUFFER", starling::proto::huge::HUGE_FROM)?;
    m.add("PROTOCOL_VERSION", starling::proto::PROTOCOL_VERSION)?;
    Ok(())
}
