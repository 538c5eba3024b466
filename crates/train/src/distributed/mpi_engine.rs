//! The MPI engine: the world communicator of the process group an MPI
//! launcher (mpirun, mpiexec, `srun --mpi=…`) started, through rsmpi.

use std::sync::Mutex;

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

use crate::{Error, Result};

/// The initialised library, finalised when the process exits.
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);
/// Calls into MPI are serialised (the library is initialised for `MPI_THREAD_SERIALIZED`).
static CALLS: Mutex<()> = Mutex::new(());

extern "C" fn finalize() {
    // Dropping the universe calls MPI_Finalize.
    if let Ok(mut universe) = UNIVERSE.lock() {
        drop(universe.take());
    }
}

#[derive(Debug)]
pub(super) struct Mpi {
    rank: usize,
    size: usize,
}

impl Mpi {
    pub(super) fn start() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::Config("MPI was already initialised in this process".into()))?;
        if !matches!(threading, Threading::Serialized | Threading::Multiple) {
            return Err(Error::Config(format!(
                "the MPI library gives thread support {threading:?}; training needs MPI_THREAD_SERIALIZED"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        *UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()) = Some(universe);
        // SAFETY: registers a plain function without captures, run once at exit.
        unsafe { libc::atexit(finalize) };
        Ok(Self { rank, size })
    }

    pub(super) fn rank(&self) -> usize {
        self.rank
    }

    pub(super) fn size(&self) -> usize {
        self.size
    }

    fn with_world<T>(&self, f: impl FnOnce(&SimpleCommunicator) -> T) -> T {
        let _turn = CALLS.lock().unwrap_or_else(|e| e.into_inner());
        f(&SimpleCommunicator::world())
    }

    pub(super) fn sum_f32(&self, values: &mut [f32]) {
        let send = values.to_vec();
        self.with_world(|w| w.all_reduce_into(&send[..], values, SystemOperation::sum()));
    }

    pub(super) fn sum_f64(&self, values: &mut [f64]) {
        let send = values.to_vec();
        self.with_world(|w| w.all_reduce_into(&send[..], values, SystemOperation::sum()));
    }

    pub(super) fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        self.with_world(|w| {
            let root = w.process_at_rank(0);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
        });
    }

    pub(super) fn barrier(&self) {
        self.with_world(|w| w.barrier());
    }

    pub(super) fn abort(&self, code: i32) -> ! {
        SimpleCommunicator::world().abort(code)
    }
}
