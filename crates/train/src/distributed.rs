//! Data-parallel training across processes: which process this is (its
//! rank among `size`), read once from the launcher's environment, and the
//! collectives the run loop needs — broadcasting rank 0's weights and
//! state, summing gradients and step values across ranks, a barrier — on
//! the engine the `distributed` feature builds in.
//!
//! The engine is MPI (OpenMPI through rsmpi): a process group is what
//! `mpirun -np N` (or `srun --mpi=pmix`, or any PMI/PMIx launcher) started.
//! torchrun's rendezvous (`MASTER_ADDR`/`MASTER_PORT` with `RANK` and
//! `WORLD_SIZE`) cannot form an MPI world, so a torchrun-style environment
//! with `WORLD_SIZE > 1` that MPI does not confirm is refused rather than
//! run as N copies writing one output (docs/training.md, "Multi-process
//! training", says why c10d's Gloo was not used). Without the feature, any
//! launcher that declares more than one process is refused.
//!
//! Collectives run on the host (`f32`/`f64`/byte buffers); tensors on a
//! GPU are copied there and back.

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// This process's place in the run.
#[derive(Debug)]
pub struct World {
    /// Rank of this process, 0-based.
    pub rank: usize,
    /// Processes in the run.
    pub size: usize,
    /// Rank among the processes of this machine (the CUDA device it takes).
    pub local_rank: usize,
    #[cfg(feature = "distributed")]
    engine: Option<engine::Mpi>,
}

/// Environment variables through which launchers declare the number of processes.
const SIZE_VARIABLES: [&str; 4] = ["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"];
/// Variables that only an MPI launcher (OpenMPI, PMI-1/2, PMIx: mpirun, mpiexec, srun --mpi=…) sets.
#[cfg(feature = "distributed")]
const MPI_VARIABLES: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK"];
/// Local-rank variables, in order of preference.
#[cfg(feature = "distributed")]
const LOCAL_RANK_VARIABLES: [&str; 4] = [
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
];

fn env_number(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::Config(format!("{name}={v:?} is not a number"))),
        Err(_) => Ok(None),
    }
}

/// The sizes the environment declares, with the variables that declare them.
fn declared_sizes() -> Result<Vec<(&'static str, usize)>> {
    let mut sizes = Vec::new();
    for name in SIZE_VARIABLES {
        if let Some(n) = env_number(name)? {
            sizes.push((name, n));
        }
    }
    Ok(sizes)
}

#[cfg(feature = "distributed")]
fn local_rank() -> Result<usize> {
    for name in LOCAL_RANK_VARIABLES {
        if let Some(n) = env_number(name)? {
            return Ok(n);
        }
    }
    Ok(0)
}

static WORLD: OnceLock<std::result::Result<World, String>> = OnceLock::new();

impl World {
    /// One process alone.
    pub fn single() -> Self {
        Self {
            rank: 0,
            size: 1,
            local_rank: 0,
            #[cfg(feature = "distributed")]
            engine: None,
        }
    }

    /// This process's world, set up once from the environment (the engine
    /// starts on the first call and stops when the process exits).
    pub fn get() -> Result<&'static World> {
        WORLD
            .get_or_init(|| Self::from_env().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Config(e.clone()))
    }

    #[cfg(not(feature = "distributed"))]
    fn from_env() -> Result<Self> {
        if let Some((name, n)) = declared_sizes()?.into_iter().find(|&(_, n)| n > 1) {
            return Err(Error::Config(format!(
                "{name}={n}: this frankensplit was built without multi-process training; build it with \
                 `--features distributed` (docs/training.md, \"Multi-process training\")"
            )));
        }
        Ok(Self::single())
    }

    #[cfg(feature = "distributed")]
    fn from_env() -> Result<Self> {
        let declared = declared_sizes()?;
        let launched = MPI_VARIABLES.iter().any(|v| std::env::var_os(v).is_some());
        if !launched && declared.iter().all(|&(_, n)| n <= 1) {
            return Ok(Self::single());
        }
        let engine = engine::Mpi::start()?;
        let (rank, size) = (engine.rank(), engine.size());
        if let Some((name, n)) = declared.iter().find(|&&(_, n)| n != size) {
            return Err(Error::Config(format!(
                "{name}={n} but MPI sees {size} process(es): multi-process training runs on MPI, so start it with \
                 an MPI launcher (`mpirun -np {n} frankensplit train …`, or `srun --mpi=pmix`); torchrun's \
                 rendezvous cannot form an MPI world"
            )));
        }
        if let Some(r) = env_number("RANK")? {
            if r != rank {
                return Err(Error::Config(format!(
                    "RANK={r} but MPI gives this process rank {rank}"
                )));
            }
        }
        Ok(Self {
            rank,
            size,
            local_rank: local_rank()?,
            engine: Some(engine),
        })
    }

    /// Whether this is rank 0, the process that reads and writes the run's files.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// The device this process computes on: with several processes, CUDA
    /// device `local_rank` when `device` is a CUDA device.
    pub fn device(&self, device: Device) -> Device {
        match device {
            Device::Cuda(_) if self.size > 1 => Device::Cuda(self.local_rank),
            other => other,
        }
    }

    /// Sums `values` across ranks, in place.
    pub fn sum_f32(&self, values: &mut [f32]) {
        #[cfg(feature = "distributed")]
        if let Some(engine) = &self.engine {
            engine.sum_f32(values);
        }
        let _ = values;
    }

    /// Sums `values` across ranks, in place.
    pub fn sum_f64(&self, values: &mut [f64]) {
        #[cfg(feature = "distributed")]
        if let Some(engine) = &self.engine {
            engine.sum_f64(values);
        }
        let _ = values;
    }

    /// Replaces `bytes` with rank 0's (of any length).
    pub fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        #[cfg(feature = "distributed")]
        if let Some(engine) = &self.engine {
            engine.broadcast_bytes(bytes);
        }
        let _ = bytes;
    }

    /// Waits until every rank has got here.
    pub fn barrier(&self) {
        #[cfg(feature = "distributed")]
        if let Some(engine) = &self.engine {
            engine.barrier();
        }
    }

    /// Ends every process of the run (after this one failed), when there are several.
    pub fn abort_others(&self) {
        #[cfg(feature = "distributed")]
        if let Some(engine) = &self.engine {
            if self.size > 1 {
                engine.abort(1);
            }
        }
    }

    /// Overwrites `tensors` (in place, whatever their kinds and devices) with rank 0's values.
    pub fn broadcast_tensors(&self, tensors: &[Tensor]) -> Result<()> {
        if self.size <= 1 || tensors.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::new();
        let mut spans = Vec::with_capacity(tensors.len());
        for t in tensors {
            let raw = Vec::<u8>::try_from(
                t.detach()
                    .to_device(Device::Cpu)
                    .contiguous()
                    .flatten(0, -1)
                    .view_dtype(Kind::Uint8),
            )?;
            spans.push(raw.len());
            bytes.extend(raw);
        }
        let own = bytes.len();
        self.broadcast_bytes(&mut bytes);
        if bytes.len() != own {
            return Err(Error::Data(format!(
                "rank {}: rank 0's weights have {} bytes, this process's {own}: the ranks run different models",
                self.rank,
                bytes.len()
            )));
        }
        let mut offset = 0;
        for (t, n) in tensors.iter().zip(spans) {
            let values = Tensor::from_slice(&bytes[offset..offset + n])
                .view_dtype(t.kind())
                .view(t.size().as_slice())
                .to_device(t.device());
            tch::no_grad(|| t.shallow_clone().copy_(&values));
            offset += n;
        }
        Ok(())
    }

    /// Replaces the gradients of `params` with their mean across ranks
    /// (one host buffer for all of them; parameters without a gradient are
    /// left out, the same ones on every rank since every rank runs the same graph).
    pub fn average_gradients(&self, params: &[Tensor]) -> Result<()> {
        if self.size <= 1 {
            return Ok(());
        }
        let grads: Vec<Tensor> = params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
        if grads.is_empty() {
            return Ok(());
        }
        let flat: Vec<Tensor> = grads
            .iter()
            .map(|g| g.detach().to_kind(Kind::Float).reshape([-1]).to_device(Device::Cpu))
            .collect();
        let mut values = Vec::<f32>::try_from(Tensor::cat(&flat, 0))?;
        self.sum_f32(&mut values);
        let scale = 1.0 / self.size as f32;
        values.iter_mut().for_each(|v| *v *= scale);
        let mut offset = 0i64;
        let all = Tensor::from_slice(&values);
        for g in &grads {
            let n = g.numel() as i64;
            let mean = all
                .narrow(0, offset, n)
                .view(g.size().as_slice())
                .to_kind(g.kind())
                .to_device(g.device());
            tch::no_grad(|| g.shallow_clone().copy_(&mean));
            offset += n;
        }
        Ok(())
    }
}

/// The MPI engine: the world communicator of the process group the launcher started.
#[cfg(feature = "distributed")]
mod engine {
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
}
