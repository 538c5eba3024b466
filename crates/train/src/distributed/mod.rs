//! Data-parallel training across processes: which process this is (its
//! rank among `size`), read once from the launcher's environment, and the
//! collectives the run loop needs — broadcasting rank 0's weights and
//! state, summing gradients and step values across ranks, a barrier — on
//! an existing engine the build feature brings in:
//!
//! - `distributed`: MPI (OpenMPI through rsmpi), for CPUs; the world is
//!   what `mpirun -np N`, `srun --mpi=pmix` or any PMI/PMIx launcher
//!   started. Collectives run on host buffers (tensors on a GPU are copied
//!   there and back).
//! - `nccl`: c10d's ProcessGroupNCCL, for GPUs, as DistributedDataParallel
//!   runs; the ranks torchrun (or a script exporting its variables)
//!   started meet at a c10d TCPStore. Gradients are summed on the GPU.
//!
//! A launcher whose engine is not built in, or that declares more
//! processes than its engine sees, is refused rather than run as N copies
//! writing one output (docs/training.md, "Multi-process training", says
//! why c10d's Gloo is not the CPU engine).

mod launch;
#[cfg(feature = "distributed")]
mod mpi_engine;
#[cfg(feature = "nccl")]
mod nccl_engine;

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};
use launch::Launch;

/// This process's place in the run.
#[derive(Debug)]
pub struct World {
    /// Rank of this process, 0-based.
    pub rank: usize,
    /// Processes in the run.
    pub size: usize,
    /// Rank among the processes of this machine (the CUDA device it takes).
    pub local_rank: usize,
    engine: Engine,
}

/// The engine the collectives run on.
#[derive(Debug)]
enum Engine {
    /// One process: nothing to exchange.
    Alone,
    #[cfg(feature = "distributed")]
    Mpi(mpi_engine::Mpi),
    #[cfg(feature = "nccl")]
    Nccl(nccl_engine::Nccl),
}

static WORLD: OnceLock<std::result::Result<World, String>> = OnceLock::new();

impl World {
    /// One process alone.
    pub fn single() -> Self {
        Self {
            rank: 0,
            size: 1,
            local_rank: 0,
            engine: Engine::Alone,
        }
    }

    /// This process's world, set up once from the environment for training
    /// on `device` (the engine starts on the first call and stops when the
    /// process exits; later calls return the first call's world).
    pub fn get(device: Device) -> Result<&'static World> {
        WORLD
            .get_or_init(|| Self::from_env(device).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Config(e.clone()))
    }

    fn from_env(device: Device) -> Result<Self> {
        let env = |name: &str| std::env::var(name).ok();
        match launch::detect(&env)? {
            Launch::Single => Ok(Self::single()),
            Launch::Mpi { declared } => Self::over_mpi(&declared, &env),
            // torchrun with one process on a CPU (or in a build without NCCL): nothing to exchange.
            Launch::Torchrun(rendezvous) if rendezvous.size == 1 && !(cfg!(feature = "nccl") && device.is_cuda()) => {
                Ok(Self::single())
            }
            Launch::Torchrun(rendezvous) if !device.is_cuda() => Err(Error::Config(format!(
                "WORLD_SIZE={}: torchrun (or its variables) started this process, and its engine is NCCL, which \
                 needs `--device cuda`; on CPUs start the run with `mpirun` (`--features distributed`, \
                 docs/training.md, \"Multi-process training\")",
                rendezvous.size
            ))),
            Launch::Torchrun(rendezvous) => Self::over_nccl(&rendezvous),
        }
    }

    #[cfg(feature = "distributed")]
    fn over_mpi(declared: &[(&str, usize)], env: &impl Fn(&str) -> Option<String>) -> Result<Self> {
        let engine = mpi_engine::Mpi::start()?;
        let (rank, size) = (engine.rank(), engine.size());
        if let Some((name, n)) = declared.iter().find(|&&(_, n)| n != size) {
            return Err(Error::Config(format!(
                "{name}={n} but MPI sees {size} process(es): start every process with the same MPI launcher \
                 (`mpirun -np {n} frankensplit train …`, or `srun --mpi=pmix`)"
            )));
        }
        if let Some(r) = launch::number(env, "RANK")? {
            if r != rank {
                return Err(Error::Config(format!(
                    "RANK={r} but MPI gives this process rank {rank}"
                )));
            }
        }
        Ok(Self {
            rank,
            size,
            local_rank: launch::local_rank(env)?,
            engine: Engine::Mpi(engine),
        })
    }

    #[cfg(not(feature = "distributed"))]
    fn over_mpi(declared: &[(&str, usize)], _env: &impl Fn(&str) -> Option<String>) -> Result<Self> {
        match declared.iter().find(|&&(_, n)| n > 1) {
            Some((name, n)) => Err(Error::Config(format!(
                "{name}={n}: an MPI launcher started this process, but this frankensplit was built without MPI; \
                 build it with `--features distributed` (docs/training.md, \"Multi-process training\")"
            ))),
            None => Ok(Self::single()),
        }
    }

    #[cfg(feature = "nccl")]
    fn over_nccl(rendezvous: &launch::Rendezvous) -> Result<Self> {
        let engine = nccl_engine::Nccl::start(rendezvous)?;
        Ok(Self {
            rank: rendezvous.rank,
            size: rendezvous.size,
            local_rank: rendezvous.local_rank,
            engine: Engine::Nccl(engine),
        })
    }

    #[cfg(not(feature = "nccl"))]
    fn over_nccl(rendezvous: &launch::Rendezvous) -> Result<Self> {
        Err(Error::Config(format!(
            "WORLD_SIZE={}: torchrun (or its variables) started this process, but this frankensplit was built \
             without NCCL; build it with `--features nccl` for GPUs (scripts/setup-nccl.sh), or start it with \
             `mpirun` and `--features distributed` on CPUs (docs/training.md, \"Multi-process training\")",
            rendezvous.size
        )))
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

    /// `tensor` summed across ranks, on `tensor`'s device: over MPI through
    /// a host buffer (`f32` for `f32` tensors, else `f64`), over NCCL on the
    /// GPU, in `tensor`'s own storage when it is already contiguous there
    /// (it is taken by value: the caller gives it up).
    pub fn sum_tensor(&self, tensor: Tensor) -> Result<Tensor> {
        match &self.engine {
            Engine::Alone => Ok(tensor),
            #[cfg(feature = "distributed")]
            Engine::Mpi(engine) => {
                let host = tensor.detach().to_device(Device::Cpu).reshape([-1]);
                let summed = if tensor.kind() == Kind::Float {
                    let mut values = Vec::<f32>::try_from(&host)?;
                    engine.sum_f32(&mut values);
                    Tensor::from_slice(&values)
                } else {
                    let mut values = Vec::<f64>::try_from(host.to_kind(Kind::Double))?;
                    engine.sum_f64(&mut values);
                    Tensor::from_slice(&values)
                };
                Ok(summed
                    .view(tensor.size().as_slice())
                    .to_kind(tensor.kind())
                    .to_device(tensor.device()))
            }
            #[cfg(feature = "nccl")]
            Engine::Nccl(engine) => {
                let on_device = tensor.detach().to_device(engine.device()).contiguous();
                engine.sum(&on_device)?;
                Ok(on_device.to_device(tensor.device()))
            }
        }
    }

    /// Replaces `bytes` with rank 0's (of any length).
    pub fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()> {
        match &self.engine {
            Engine::Alone => {
                let _ = bytes;
                Ok(())
            }
            #[cfg(feature = "distributed")]
            Engine::Mpi(engine) => {
                engine.broadcast_bytes(bytes);
                Ok(())
            }
            #[cfg(feature = "nccl")]
            Engine::Nccl(engine) => {
                let len = Tensor::from_slice(&[bytes.len() as i64]).to_device(engine.device());
                engine.broadcast(&len)?;
                let n = i64::try_from(&len)? as usize;
                bytes.resize(n, 0);
                let data = Tensor::from_slice(bytes.as_slice()).to_device(engine.device());
                engine.broadcast(&data)?;
                data.to_device(Device::Cpu).copy_data(bytes.as_mut_slice(), n);
                Ok(())
            }
        }
    }

    /// Waits until every rank has got here.
    pub fn barrier(&self) -> Result<()> {
        match &self.engine {
            Engine::Alone => Ok(()),
            #[cfg(feature = "distributed")]
            Engine::Mpi(engine) => {
                engine.barrier();
                Ok(())
            }
            // A one-element sum read back to the host: no rank gets past it before all have joined.
            #[cfg(feature = "nccl")]
            Engine::Nccl(engine) => {
                let one = self.sum_tensor(Tensor::from_slice(&[1f32]).to_device(engine.device()))?;
                f32::try_from(one.to_device(Device::Cpu))?;
                Ok(())
            }
        }
    }

    /// Ends every process of the run (after this one failed), when there are
    /// several: MPI aborts them all; NCCL aborts this rank's communicators,
    /// and torchrun stops the others when this process exits.
    pub fn abort_others(&self) {
        if self.size <= 1 {
            return;
        }
        match &self.engine {
            Engine::Alone => {}
            #[cfg(feature = "distributed")]
            Engine::Mpi(engine) => engine.abort(1),
            #[cfg(feature = "nccl")]
            Engine::Nccl(engine) => engine.abort(),
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
        self.broadcast_bytes(&mut bytes)?;
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

    /// Replaces the gradients of `params` with their mean across ranks, as
    /// one flat buffer for all of them (on the host for MPI, on the GPU for
    /// NCCL); parameters without a gradient are left out, the same ones on
    /// every rank since every rank runs the same graph.
    pub fn average_gradients(&self, params: &[Tensor]) -> Result<()> {
        if self.size <= 1 {
            return Ok(());
        }
        let grads: Vec<Tensor> = params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
        if grads.is_empty() {
            return Ok(());
        }
        let device = match &self.engine {
            #[cfg(feature = "nccl")]
            Engine::Nccl(engine) => engine.device(),
            _ => Device::Cpu,
        };
        let flat: Vec<Tensor> = grads
            .iter()
            .map(|g| g.detach().to_kind(Kind::Float).reshape([-1]).to_device(device))
            .collect();
        let all = self.sum_tensor(Tensor::cat(&flat, 0))?;
        let all = all / self.size as f64;
        let mut offset = 0i64;
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
