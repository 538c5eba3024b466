//! Which launcher started this process, read from its environment: one
//! process alone, an MPI launcher (mpirun, mpiexec, `srun --mpi=…`), or a
//! torchrun-style launcher (torchrun, torch.distributed.launch, or a Slurm
//! script that exports the same variables) whose rendezvous is a c10d
//! TCPStore at `MASTER_ADDR:MASTER_PORT`.

use crate::{Error, Result};

/// Environment variables through which launchers declare the number of processes.
pub(crate) const SIZE_VARIABLES: [&str; 4] = ["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"];
/// Variables that only an MPI launcher (OpenMPI, PMI-1/2, PMIx: mpirun, mpiexec, srun --mpi=…) sets.
pub(crate) const MPI_VARIABLES: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK"];
/// Local-rank variables, in order of preference.
pub(crate) const LOCAL_RANK_VARIABLES: [&str; 4] = [
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
];
/// What torchrun exports to every worker; all of them are needed to meet at the store.
const TORCHRUN_VARIABLES: [&str; 4] = ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"];

/// How this process was started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Launch {
    /// One process: no launcher, or one that declares a single process.
    Single,
    /// An MPI launcher: the world is MPI's.
    Mpi {
        /// The sizes the environment declares, to check against MPI's.
        declared: Vec<(&'static str, usize)>,
    },
    /// torchrun's variables: the ranks meet at a TCPStore.
    Torchrun(Rendezvous),
}

/// Where and as whom a torchrun-started process meets the others.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(crate) struct Rendezvous {
    /// The store's host (`MASTER_ADDR`).
    pub host: String,
    /// The store's port (`MASTER_PORT`).
    pub port: u16,
    /// This process's rank (`RANK`).
    pub rank: usize,
    /// Processes in the run (`WORLD_SIZE`).
    pub size: usize,
    /// Rank on this machine (`LOCAL_RANK`): the CUDA device it takes.
    pub local_rank: usize,
    /// Whether this process hosts the store: rank 0, unless the launcher's
    /// agent already hosts it (`TORCHELASTIC_USE_AGENT_STORE=True`, as
    /// torchrun sets), in which case every rank is a client.
    pub host_store: bool,
    /// Key prefix of this attempt: a restarted torchrun group
    /// (`TORCHELASTIC_RESTART_COUNT`) meets under fresh keys of the
    /// agent's long-lived store, as PyTorch's `env://` initialisation does.
    pub prefix: String,
}

/// Reads a non-negative number from the environment.
pub(crate) fn number(env: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    match env(name) {
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::Config(format!("{name}={v:?} is not a number"))),
        None => Ok(None),
    }
}

/// The sizes the environment declares, with the variables that declare them.
pub(crate) fn declared_sizes(env: &impl Fn(&str) -> Option<String>) -> Result<Vec<(&'static str, usize)>> {
    let mut sizes = Vec::new();
    for name in SIZE_VARIABLES {
        if let Some(n) = number(env, name)? {
            sizes.push((name, n));
        }
    }
    Ok(sizes)
}

/// This process's rank on its machine (0 when no launcher says).
pub(crate) fn local_rank(env: &impl Fn(&str) -> Option<String>) -> Result<usize> {
    for name in LOCAL_RANK_VARIABLES {
        if let Some(n) = number(env, name)? {
            return Ok(n);
        }
    }
    Ok(0)
}

/// Reads the launcher from `env` (a variable's value, if set).
pub(crate) fn detect(env: &impl Fn(&str) -> Option<String>) -> Result<Launch> {
    let declared = declared_sizes(env)?;
    if MPI_VARIABLES.iter().any(|v| env(v).is_some()) {
        return Ok(Launch::Mpi { declared });
    }
    if declared.iter().all(|&(_, n)| n <= 1) {
        return Ok(Launch::Single);
    }
    let missing: Vec<&str> = TORCHRUN_VARIABLES
        .iter()
        .copied()
        .filter(|v| env(v).is_none())
        .collect();
    if !missing.is_empty() {
        let (name, n) = declared
            .iter()
            .find(|&&(_, n)| n > 1)
            .copied()
            .unwrap_or(("WORLD_SIZE", 0));
        return Err(Error::Config(format!(
            "{name}={n} declares several processes, but neither an MPI launcher's variables nor torchrun's are \
             all set (missing: {}): start the run with `torchrun --no-python frankensplit train …` (NCCL, GPUs) \
             or `mpirun -np {n} frankensplit train …` (MPI)",
            missing.join(", ")
        )));
    }
    let rank = number(env, "RANK")?.unwrap_or(0);
    let size = number(env, "WORLD_SIZE")?.unwrap_or(1);
    if rank >= size {
        return Err(Error::Config(format!("RANK={rank} is not below WORLD_SIZE={size}")));
    }
    let host = env("MASTER_ADDR").unwrap_or_default().trim().to_string();
    if host.is_empty() {
        return Err(Error::Config(
            "MASTER_ADDR is empty: set it to the host of rank 0 (or of torchrun's agent)".into(),
        ));
    }
    let port_text = env("MASTER_PORT").unwrap_or_default();
    let port: u16 = port_text
        .trim()
        .parse()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| Error::Config(format!("MASTER_PORT={port_text:?} is not a port (1–65535)")))?;
    let agent_store = env("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True");
    let attempt = number(env, "TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0);
    Ok(Launch::Torchrun(Rendezvous {
        host,
        port,
        rank,
        size,
        local_rank: local_rank(env)?,
        host_store: rank == 0 && !agent_store,
        prefix: format!("frankensplit/attempt_{attempt}/"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    fn torchrun(rank: &str, extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", "4".to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("MASTER_ADDR", "10.0.0.7".to_string()),
            ("MASTER_PORT", "29400".to_string()),
        ];
        for &(name, value) in extra {
            vars.retain(|(k, _)| *k != name);
            vars.push((name, value.to_string()));
        }
        vars
    }

    fn detect_pairs(vars: &[(&'static str, String)]) -> Result<Launch> {
        let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        detect(&env_of(&pairs))
    }

    #[test]
    fn no_launcher_or_a_world_of_one_is_a_single_process() {
        assert_eq!(detect(&env_of(&[])).unwrap(), Launch::Single);
        assert_eq!(
            detect(&env_of(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(),
            Launch::Single
        );
    }

    #[test]
    fn mpi_variables_mean_mpi_even_beside_torchrun_ones() {
        let launch = detect(&env_of(&[
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
        ]))
        .unwrap();
        assert_eq!(
            launch,
            Launch::Mpi {
                declared: vec![("WORLD_SIZE", 2), ("OMPI_COMM_WORLD_SIZE", 2)]
            }
        );
    }

    #[test]
    fn torchrun_with_its_agent_store_makes_every_rank_a_client_under_the_attempts_prefix() {
        let vars = torchrun(
            "0",
            &[
                ("TORCHELASTIC_USE_AGENT_STORE", "True"),
                ("TORCHELASTIC_RESTART_COUNT", "2"),
            ],
        );
        let Launch::Torchrun(r) = detect_pairs(&vars).unwrap() else {
            panic!("not torchrun")
        };
        assert_eq!(
            (r.host.as_str(), r.port, r.rank, r.size, r.local_rank),
            ("10.0.0.7", 29400, 0, 4, 0)
        );
        assert!(
            !r.host_store,
            "rank 0 must not start a second store where the agent's listens"
        );
        assert_eq!(r.prefix, "frankensplit/attempt_2/");
    }

    #[test]
    fn without_an_agent_store_rank_zero_hosts_it() {
        let Launch::Torchrun(zero) = detect_pairs(&torchrun("0", &[])).unwrap() else {
            panic!("not torchrun")
        };
        let Launch::Torchrun(three) =
            detect_pairs(&torchrun("3", &[("TORCHELASTIC_USE_AGENT_STORE", "False")])).unwrap()
        else {
            panic!("not torchrun")
        };
        assert!(zero.host_store);
        assert!(!three.host_store);
        assert_eq!((three.rank, three.local_rank), (3, 3));
        assert_eq!(zero.prefix, "frankensplit/attempt_0/");
    }

    #[test]
    fn an_incomplete_or_wrong_torchrun_environment_is_refused_with_what_to_fix() {
        let err = detect(&env_of(&[("WORLD_SIZE", "2"), ("RANK", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MASTER_ADDR, MASTER_PORT") && err.contains("torchrun"),
            "{err}"
        );
        for (rank, extra, expected) in [
            ("4", ("TORCHELASTIC_RESTART_COUNT", "0"), "RANK=4"),
            ("1", ("MASTER_PORT", "70000"), "MASTER_PORT=\"70000\""),
            ("1", ("WORLD_SIZE", "two"), "WORLD_SIZE=\"two\""),
        ] {
            let err = detect_pairs(&torchrun(rank, &[extra])).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }
}
