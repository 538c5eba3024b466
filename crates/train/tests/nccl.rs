//! The NCCL engine's launch (feature `nccl`): processes started with
//! torchrun's variables meet at c10d's TCPStore, by real torchrun (whose
//! agent hosts the store) and by a launcher that only exports the variables
//! (rank 0 hosts it). On a machine without GPUs every rank then stops with
//! the message that NCCL needs one per process, after it met the others;
//! where GPUs are, tools/bench/gpu_nccl.sh trains over NCCL.
//!
//! The test starts the ranks itself: this test binary again, filtered to
//! the rank entry below, with `FRANKENSPLIT_TEST_RANK` set. Real torchrun
//! comes from `FRANKENSPLIT_TORCHRUN` (a command line, e.g. `python3 -m
//! torch.distributed.run`; scripts/test.sh sets it up from the libtorch
//! install); without it the test fails.
#![cfg(feature = "nccl")]

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};

use frankensplit_train::distributed::World;

const RANK_ENTRY: &str = "FRANKENSPLIT_TEST_RANK";
/// Set: the rank asks for the CPU instead of `cuda`.
const ON_CPU: &str = "FRANKENSPLIT_TEST_CPU";

/// When this process is a rank started by the test: joins the world and
/// prints what happened.
#[test]
fn rank_entry() {
    if std::env::var_os(RANK_ENTRY).is_none() {
        return;
    }
    let device = if std::env::var_os(ON_CPU).is_some() {
        tch::Device::Cpu
    } else {
        tch::Device::Cuda(0)
    };
    match World::get(device) {
        Ok(world) => println!("joined as rank {} of {}", world.rank, world.size),
        Err(e) => println!("refused: {e}"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn rank_command() -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "rank_entry", "--nocapture", "--test-threads", "1"])
        .env(RANK_ENTRY, "1");
    for v in [
        "TORCHELASTIC_USE_AGENT_STORE",
        "TORCHELASTIC_RESTART_COUNT",
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
    ] {
        command.env_remove(v);
    }
    command
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Each rank met the others and was then refused for want of a GPU (or,
/// on a machine with GPUs, joined).
fn assert_met(all: &str, ranks: usize) {
    let gpus = tch::Cuda::device_count() as usize;
    for rank in 0..ranks {
        let met = if gpus >= ranks {
            all.contains(&format!("joined as rank {rank} of {ranks}"))
        } else {
            all.contains(&format!(
                "refused: rank {rank} met the others, but the NCCL engine needs a CUDA device"
            ))
        };
        assert!(met, "rank {rank} of {ranks} did not get through the rendezvous:\n{all}");
    }
}

#[test]
fn ranks_exporting_torchruns_variables_meet_at_rank_zeros_store() {
    let port = free_port().to_string();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            rank_command()
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let all: String = children
        .into_iter()
        .map(|c| text(&c.wait_with_output().unwrap()))
        .collect();
    assert_met(&all, 2);
}

#[test]
fn ranks_started_by_torchrun_on_the_cpu_are_pointed_to_mpirun() {
    let port = free_port().to_string();
    let output = rank_command()
        .env("RANK", "1")
        .env("LOCAL_RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", &port)
        .env(ON_CPU, "1")
        .output()
        .unwrap();
    let all = text(&output);
    assert!(
        all.contains("refused: WORLD_SIZE=2: torchrun") && all.contains("`--device cuda`") && all.contains("mpirun"),
        "{all}"
    );
}

#[test]
fn torchrun_starts_ranks_that_meet_at_its_agents_store() {
    let launcher = std::env::var("FRANKENSPLIT_TORCHRUN").expect(
        "FRANKENSPLIT_TORCHRUN must name torchrun (e.g. `python3 -m torch.distributed.run`); scripts/test.sh sets it",
    );
    let mut words = launcher.split_whitespace();
    let mut command = Command::new(words.next().expect("FRANKENSPLIT_TORCHRUN is empty"));
    command.args(words);
    let rank = rank_command();
    let output = command
        .args([
            "--nnodes",
            "1",
            "--nproc-per-node",
            "3",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &free_port().to_string(),
            "--no-python",
        ])
        .arg(rank.get_program())
        .args(rank.get_args())
        .env(RANK_ENTRY, "1")
        .output()
        .unwrap();
    let all = text(&output);
    assert!(output.status.success(), "torchrun failed:\n{all}");
    assert_met(&all, 3);
}
