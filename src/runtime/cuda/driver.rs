//! The CUDA driver, through cudarc's dynamically loaded driver API: finding a GPU without ever
//! panicking, and small owners (device memory, stream, module, graph) that free what they hold.
//!
//! cudarc panics when `libcuda` is missing, so [`open_device`] checks for the library first, and
//! wraps the first call in `catch_unwind` as well (a library without a symbol cudarc wants would
//! panic too). Every failure here is an environment error (exit 3) that says what is missing.

use crate::error::env;
use anyhow::Result;
use cudarc::driver::{result, sys, CudaContext, DriverError};
use std::ffi::c_void;
use std::sync::Arc;

/// The device to run on: the context (cudarc's primary context of GPU 0) and what it is.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub name: String,
    /// Compute capability as `major * 10 + minor` (sm_90 → 90).
    pub sm: u32,
}

fn driver_err(what: &str, e: DriverError) -> anyhow::Error {
    env(format!("CUDA {what} failed: {e:?}"))
}

/// Whether the CUDA driver library can be loaded (a GPU may still be missing).
pub fn driver_present() -> bool {
    // SAFETY: only tries to open candidate library names; never panics.
    unsafe { sys::is_culib_present() }
}

/// Open GPU 0. No driver library, no GPU or a driver error: an environment error, never a panic.
pub fn open_device() -> Result<Device> {
    if !driver_present() {
        return Err(env(
            "no CUDA driver: libcuda.so (the NVIDIA driver's library) cannot be loaded, so this \
             machine cannot run the cuda target. Run on a machine with an NVIDIA GPU and its \
             driver, or pass `--device cpu` (any artifact runs on the CPU)",
        ));
    }
    let opened = std::panic::catch_unwind(|| CudaContext::new(0));
    let ctx = match opened {
        Ok(Ok(ctx)) => ctx,
        Ok(Err(e)) => {
            return Err(env(format!(
                "no usable CUDA GPU: {e:?}. Run on a machine with an NVIDIA GPU, or pass `--device cpu`"
            )))
        }
        Err(_) => {
            return Err(env(
                "the CUDA driver library could not be used (cudarc could not load it); check the \
                 NVIDIA driver installation, or pass `--device cpu`",
            ))
        }
    };
    let name = ctx.name().unwrap_or_else(|_| "unknown CUDA device".into());
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| driver_err("compute capability query", e))?;
    Ok(Device {
        ctx,
        name,
        sm: (major * 10 + minor) as u32,
    })
}

/// Device memory owned by this value (freed on drop). Allocations are 256-byte aligned, so
/// every buffer the kernels read with 16-byte loads starts aligned.
pub struct DeviceMem {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
}

impl DeviceMem {
    /// `bytes` (at least 16, so an empty record still has an address) of uninitialised memory.
    pub fn alloc(bytes: usize, what: &str) -> Result<DeviceMem> {
        let n = bytes.max(16);
        // SAFETY: a plain allocation in the current context (bound by the caller).
        let ptr = unsafe { result::malloc_sync(n) }.map_err(|e| {
            env(format!(
                "cannot allocate {n} bytes of GPU memory for {what}: {e:?} (the model and its KV cache must fit in the GPU's memory; build with a smaller max_seq_len or a smaller quantization)"
            ))
        })?;
        Ok(DeviceMem { ptr, bytes: n })
    }

    /// A copy of `data` in device memory.
    pub fn from_bytes(data: &[u8], what: &str) -> Result<DeviceMem> {
        let m = DeviceMem::alloc(data.len(), what)?;
        m.write(data, what)?;
        Ok(m)
    }

    /// Zero-filled memory.
    pub fn zeroed(bytes: usize, what: &str) -> Result<DeviceMem> {
        let m = DeviceMem::alloc(bytes, what)?;
        // SAFETY: `m` holds `m.bytes` bytes.
        unsafe { result::memset_d8_sync(m.ptr, 0, m.bytes) }
            .map_err(|e| driver_err(&format!("clearing {what}"), e))?;
        settle(what)?;
        Ok(m)
    }

    /// Overwrite the start of this memory with `data` (at most `self.bytes`), done on return.
    pub fn write<T: Copy>(&self, data: &[T], what: &str) -> Result<()> {
        assert!(
            std::mem::size_of_val(data) <= self.bytes,
            "write past the end of {what}"
        );
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: the memory holds at least `size_of_val(data)` bytes (checked above).
        unsafe { result::memcpy_htod_sync(self.ptr, data) }
            .map_err(|e| driver_err(&format!("upload of {what}"), e))?;
        settle(what)
    }

    /// A copy of this memory on the host (the caller has waited for the kernels writing it).
    pub fn read(&self, what: &str) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.bytes];
        // SAFETY: `out` holds `self.bytes` bytes, as this memory does.
        unsafe { result::memcpy_dtoh_sync(&mut out, self.ptr) }
            .map_err(|e| driver_err(&format!("download of {what}"), e))?;
        Ok(out)
    }
}

/// Waits until everything the context was asked to do has been done. The "synchronous" copy from
/// pageable memory and memset run on the legacy default stream and may return before the data
/// lands (the copy once it is staged; the memset at once), and the kernels run on a non-blocking
/// stream, which is not ordered after the legacy one: without this, a kernel could read weights
/// or a zeroed counter before they arrive. (Seen on an H200: attention models' first calls,
/// several processes sharing the GPU, read not-yet-uploaded weights as zeros.)
fn settle(what: &str) -> Result<()> {
    result::ctx::synchronize()
        .map_err(|e| driver_err(&format!("completing the upload of {what}"), e))
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_sync and freed once. A failure cannot be reported from drop.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// A non-blocking stream (capturable into a graph, unlike the legacy default stream).
pub struct Stream(pub sys::CUstream);

impl Stream {
    pub fn new() -> Result<Stream> {
        result::stream::create(result::stream::StreamKind::NonBlocking)
            .map(Stream)
            .map_err(|e| driver_err("stream creation", e))
    }
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live stream.
        unsafe { result::stream::synchronize(self.0) }
            .map_err(|e| driver_err("kernel execution", e))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { result::stream::destroy(self.0) };
    }
}

/// A CUDA event (destroyed on drop): marks a point of a stream, for GPU-side timing.
pub struct Event(sys::CUevent);

impl Event {
    pub fn new() -> Result<Event> {
        result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map(Event)
            .map_err(|e| driver_err("event creation", e))
    }

    /// Marks the point after everything enqueued on `stream` so far.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: a live event and a live stream.
        unsafe { result::event::record(self.0, stream.0) }
            .map_err(|e| driver_err("event record", e))
    }

    /// Seconds between two recorded events that have completed.
    pub fn elapsed_s(start: &Event, end: &Event) -> Result<f64> {
        // SAFETY: both events are live; the driver reports an error if either has not completed.
        let ms = unsafe { result::event::elapsed(start.0, end.0) }
            .map_err(|e| driver_err("event timing", e))?;
        Ok(ms as f64 * 1e-3)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { result::event::destroy(self.0) };
    }
}

/// A loaded PTX module and one function of it.
pub struct Kernel {
    module: sys::CUmodule,
    pub function: sys::CUfunction,
}

impl Kernel {
    /// JIT-compile `ptx` for the device and look up `entry`.
    pub fn load(ptx: &[u8], entry: &str, signature: &str) -> Result<Kernel> {
        let mut text = ptx.to_vec();
        if text.contains(&0) {
            crate::user_bail!(
                "kernel {signature}: its PTX contains a NUL byte; the library is corrupt"
            );
        }
        text.push(0);
        // SAFETY: a NUL-terminated PTX image.
        let module = unsafe { result::module::load_data(text.as_ptr() as *const c_void) }
            .map_err(|e| {
                env(format!(
                    "the CUDA driver cannot load kernel {signature}: {e:?} (a driver older than the NVRTC that compiled the library rejects its PTX; update the driver or rebuild with NVRTC 13.0)"
                ))
            })?;
        let name = std::ffi::CString::new(entry)
            .map_err(|_| crate::error::user(format!("kernel {signature}: bad entry point name")))?;
        // SAFETY: a live module and a C string.
        let function = match unsafe { result::module::get_function(module, name) } {
            Ok(f) => f,
            Err(e) => {
                // SAFETY: loaded above, unloaded once.
                let _ = unsafe { result::module::unload(module) };
                crate::user_bail!(
                    "kernel {signature}: entry point {entry} is not in its PTX ({e:?}); the library is corrupt"
                );
            }
        };
        Ok(Kernel { module, function })
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // SAFETY: loaded by `load`, unloaded once.
        let _ = unsafe { result::module::unload(self.module) };
    }
}

/// An instantiated CUDA graph (the captured decode step).
pub struct Graph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

impl Graph {
    /// Capture what `record` enqueues on `stream` into a graph.
    pub fn capture(stream: &Stream, record: impl FnOnce() -> Result<()>) -> Result<Graph> {
        // SAFETY: a live stream; relaxed mode so nothing outside the stream is disturbed.
        unsafe {
            result::stream::begin_capture(
                stream.0,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        }
        .map_err(|e| driver_err("graph capture start", e))?;
        let recorded = record();
        // SAFETY: capture was started on this stream; always end it, even after an error.
        let graph = unsafe { result::stream::end_capture(stream.0) };
        if let Err(e) = recorded {
            if let Ok(g) = graph {
                if !g.is_null() {
                    // SAFETY: the graph just captured, destroyed once.
                    let _ = unsafe { result::graph::destroy(g) };
                }
            }
            return Err(e);
        }
        let graph = graph.map_err(|e| driver_err("graph capture", e))?;
        if graph.is_null() {
            return Err(anyhow::anyhow!("CUDA graph capture produced no graph"));
        }
        // SAFETY: a valid graph.
        match unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) } {
            Ok(exec) => Ok(Graph { graph, exec }),
            Err(e) => {
                // SAFETY: destroyed once.
                let _ = unsafe { result::graph::destroy(graph) };
                Err(driver_err("graph instantiation", e))
            }
        }
    }

    pub fn launch(&self, stream: &Stream) -> Result<()> {
        // SAFETY: an instantiated graph and a live stream.
        unsafe { result::graph::launch(self.exec, stream.0) }
            .map_err(|e| driver_err("graph launch", e))
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: created by `capture`, destroyed once.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

/// Launch `k` with the given kernel parameter pointers; with `pdl`, as a programmatic dependent
/// launch (the kernel may start before the one before it on the stream has ended: only for
/// kernels that wait for it themselves, `CudaLaunch::pdl`).
pub fn launch(
    k: &Kernel,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    stream: &Stream,
    params: &mut [*mut c_void],
    signature: &str,
    pdl: bool,
) -> Result<()> {
    if !pdl {
        // SAFETY: the parameter list matches the kernel's (built from its launch JSON, which
        // codegen wrote from the same argument list as the source); every pointer is a live
        // allocation of the size the plan declares.
        return unsafe { result::launch_kernel(k.function, grid, block, 0, stream.0, params) }
            .map_err(|e| driver_err(&format!("launch of kernel {signature}"), e));
    }
    // SAFETY: a zeroed attribute is a valid C struct; the id and its union field are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block.0,
        blockDimY: block.1,
        blockDimZ: block.2,
        sharedMemBytes: 0,
        hStream: stream.0,
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: as above; `config` and `attr` outlive the call, which copies them.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            k.function,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(|e| {
        driver_err(
            &format!("launch of kernel {signature} (programmatic dependent launch)"),
            e,
        )
    })
}
