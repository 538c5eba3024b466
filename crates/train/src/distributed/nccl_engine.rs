//! The NCCL engine: the ranks a torchrun-style launcher started meet at
//! c10d's TCPStore and run their collectives on c10d's ProcessGroupNCCL,
//! the engine of PyTorch's DistributedDataParallel, through the C++ bridge
//! in `c10d.cpp`. Tensors stay on the GPU; a collective is queued on the
//! process group's NCCL stream and the current stream waits for it.

use std::ffi::{c_char, c_void, CString};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::time::Duration;

use tch::{Device, Tensor};

use super::launch::Rendezvous;
use crate::{Error, Result};

extern "C" {
    fn fs_c10d_rendezvous(
        host: *const c_char,
        port: u16,
        host_store: i32,
        size: i32,
        timeout_ms: i64,
        prefix: *const c_char,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn fs_c10d_start_nccl(
        group: *mut c_void,
        rank: i32,
        device: i32,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn fs_c10d_all_reduce_sum(group: *mut c_void, tensor: *mut c_void, err: *mut c_char, err_len: usize) -> i32;
    fn fs_c10d_broadcast(group: *mut c_void, tensor: *mut c_void, err: *mut c_char, err_len: usize) -> i32;
    fn fs_c10d_abort(group: *mut c_void);
}

/// How long the ranks wait for each other, at the store and in a collective
/// (PyTorch's default process-group timeout).
pub(super) const TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Space for the bridge's error text.
const ERROR_LEN: usize = 2048;

/// The bridge's error text, after `what` failed.
fn bridge_error(err: &[u8], what: &str) -> Error {
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Error::Config(format!("{what}: {}", String::from_utf8_lossy(&err[..end]).trim()))
}

/// Turns the bridge's status and error text into a result.
fn checked(status: i32, err: &[u8], what: &str) -> Result<()> {
    if status == 0 {
        Ok(())
    } else {
        Err(bridge_error(err, what))
    }
}

/// This rank's process group.
pub(super) struct Nccl {
    group: Mutex<NonNull<c_void>>,
    device: Device,
}

// SAFETY: the group is only touched under the mutex; c10d's process group
// may be used from any thread, one call at a time.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl").field("device", &self.device).finish()
    }
}

impl Nccl {
    /// Meets the other ranks at the store, then starts NCCL on `cuda:local_rank`.
    pub(super) fn start(rendezvous: &Rendezvous) -> Result<Self> {
        let fail = |e: String| Error::Config(e);
        let host = CString::new(rendezvous.host.as_str()).map_err(|_| fail("MASTER_ADDR holds a NUL byte".into()))?;
        let prefix = CString::new(rendezvous.prefix.as_str()).map_err(|_| fail("bad store prefix".into()))?;
        let timeout_ms = TIMEOUT.as_millis() as i64;
        let mut err = vec![0u8; ERROR_LEN];
        // SAFETY: the strings and the error buffer outlive the call; the bridge catches every exception.
        let group = unsafe {
            fs_c10d_rendezvous(
                host.as_ptr(),
                rendezvous.port,
                i32::from(rendezvous.host_store),
                rendezvous.size as i32,
                timeout_ms,
                prefix.as_ptr(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        let Some(group) = NonNull::new(group) else {
            return Err(bridge_error(
                &err,
                &format!(
                    "rank {} could not meet the other {} rank(s) at the store {}:{}",
                    rendezvous.rank,
                    rendezvous.size - 1,
                    rendezvous.host,
                    rendezvous.port
                ),
            ));
        };
        if !tch::Cuda::is_available() || tch::Cuda::device_count() <= rendezvous.local_rank as i64 {
            return Err(Error::Config(format!(
                "rank {} met the others, but the NCCL engine needs a CUDA device per process and this machine has {} \
                 (LOCAL_RANK={}): torchrun runs FrankenSplit on GPUs; on CPUs start it with `mpirun` \
                 (`--features distributed`, docs/training.md)",
                rendezvous.rank,
                tch::Cuda::device_count(),
                rendezvous.local_rank
            )));
        }
        let status = unsafe {
            fs_c10d_start_nccl(
                group.as_ptr(),
                rendezvous.rank as i32,
                rendezvous.local_rank as i32,
                timeout_ms,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        checked(status, &err, "starting NCCL")?;
        Ok(Self {
            group: Mutex::new(group),
            device: Device::Cuda(rendezvous.local_rank),
        })
    }

    /// The device this rank's collectives run on.
    pub(super) fn device(&self) -> Device {
        self.device
    }

    fn call(
        &self,
        tensor: &Tensor,
        what: &str,
        f: unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_char, usize) -> i32,
    ) -> Result<()> {
        if tensor.device() != self.device || !tensor.is_contiguous() {
            return Err(Error::Config(format!(
                "{what}: NCCL needs a contiguous tensor on {:?}, got one on {:?}",
                self.device,
                tensor.device()
            )));
        }
        let group = self.group.lock().unwrap_or_else(|e| e.into_inner());
        let mut err = vec![0u8; ERROR_LEN];
        // SAFETY: `tensor` wraps a live at::Tensor for the whole call; the bridge catches every exception.
        let status = unsafe {
            f(
                group.as_ptr(),
                tensor.as_ptr() as *mut c_void,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        checked(status, &err, what)
    }

    /// Sums `tensor` across ranks, in place.
    pub(super) fn sum(&self, tensor: &Tensor) -> Result<()> {
        self.call(tensor, "NCCL all-reduce", fs_c10d_all_reduce_sum)
    }

    /// Overwrites `tensor` with rank 0's, in place.
    pub(super) fn broadcast(&self, tensor: &Tensor) -> Result<()> {
        self.call(tensor, "NCCL broadcast", fs_c10d_broadcast)
    }

    /// Aborts this rank's communicators (after it failed), so that nothing
    /// waits on the others; torchrun then stops the rest of the group.
    pub(super) fn abort(&self) {
        let group = self.group.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: a live group; the bridge catches every exception.
        unsafe { fs_c10d_abort(group.as_ptr()) };
    }
}
