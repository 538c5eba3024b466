//! Data-parallel training over MPI on loopback (feature `distributed`):
//! two processes at a global batch of 4 (2 samples each) end with the
//! weights and optimiser state of one process at batch 4, within float
//! tolerance, through a teacher stage, stage 1 and stage 2 (maps per
//! batch); a two-process run killed after a checkpoint resumes, with two
//! processes or one, and a one-process run resumes with two.
//!
//! The test starts the processes itself: `mpirun -np 2` runs this test
//! binary again, filtered to this test, with the run file in
//! `FRANKENSPLIT_TEST_RUN`; a process started so is one rank of the run
//! (and the test function does nothing else). mpirun must be installed
//! (`scripts/setup-mpi.sh`); without it the test fails.
#![cfg(feature = "distributed")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{fixture_arch, options, small_data};
use frankensplit_train::run::{read_checkpoint, train, MetricsLine, Progress, RunConfig};
use tch::Tensor;

/// The run file a rank started by mpirun trains.
const RUN: &str = "FRANKENSPLIT_TEST_RUN";
/// Stop after this many steps (and, with `KILL`, die as if killed).
const STOP: &str = "FRANKENSPLIT_TEST_STOP";
const RESUME: &str = "FRANKENSPLIT_TEST_RESUME";
const KILL: &str = "FRANKENSPLIT_TEST_KILL";

/// Three stages of 3 steps each (12 images, global batch 4).
fn run_file(dir: &Path, output: &str) -> PathBuf {
    let text = format!(
        r#"
output = "{output}"
seed = 3
workers = 1
checkpoint_every = 1

[data]
train = "data/train"
val = "data/val"

[teacher]
split_stage = 2

[[stages]]
kind = "teacher"
epochs = 1
batch_size = 4
lr = 2e-3

[[stages]]
kind = "distill"
epochs = 1
batch_size = 4
lr = 1e-3
lmbda = 0.05

[[stages]]
kind = "saliency"
epochs = 1
batch_size = 4
lr = 4e-4
lmbda = 0.05

{}"#,
        // Without stochastic depth, whose masks each process draws for its own samples.
        fixture_arch(false)
    );
    let path = dir.join(format!("{output}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// When this process is a rank started by [`mpirun`]: trains the run file it was given.
fn run_as_rank() -> bool {
    let Some(path) = std::env::var_os(RUN) else {
        return false;
    };
    let config = RunConfig::from_file(Path::new(&path)).unwrap();
    let stop = std::env::var(STOP).ok().map(|s| s.parse().unwrap());
    let resume = std::env::var_os(RESUME).is_some();
    let world = frankensplit_train::distributed::World::get(tch::Device::Cpu).unwrap();
    // Proof for the test that this rank ran, as which rank of how many.
    std::fs::write(marker(Path::new(&path), world.rank, world.size), b"").unwrap();
    let summary = match train(&config, &options(stop, resume)) {
        Ok(summary) => summary,
        Err(e) => panic!("rank {}: {e}", world.rank),
    };
    if std::env::var_os(KILL).is_some() {
        assert_eq!(Some(summary.progress.global_step), stop);
        // A crash after the checkpoint: no finalisation, no clean exit.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    true
}

/// The file a rank of `run_file`'s run leaves to say it ran.
fn marker(run_file: &Path, rank: usize, size: usize) -> PathBuf {
    run_file.with_extension(format!("rank-{rank}-of-{size}"))
}

/// How a run under mpirun is to end.
#[derive(PartialEq)]
enum End {
    /// Every rank finishes.
    Clean,
    /// Every rank stops after the given step and kills itself.
    Killed,
    /// A rank fails with an error.
    Failed,
}

/// Runs this test in `n` processes under mpirun (loopback TCP), each one a
/// rank of the run in `run_file`; checks that it ended as `end` says, and
/// returns the ranks' standard error.
fn mpirun(n: usize, run_file: &Path, stop: Option<u64>, resume: bool, end: End) -> String {
    let kill = end == End::Killed;
    let test = std::env::current_exe().unwrap();
    let mut command = Command::new("mpirun");
    command.args(["-np", &n.to_string(), "--oversubscribe"]);
    // Loopback TCP between the ranks (no shared-memory transport), as between machines.
    command.args(["--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo"]);
    command
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    command.env(RUN, run_file).args(["-x", RUN]);
    if let Some(stop) = stop {
        command.env(STOP, stop.to_string()).args(["-x", STOP]);
    }
    if resume {
        command.env(RESUME, "1").args(["-x", RESUME]);
    }
    if kill {
        command.env(KILL, "1").args(["-x", KILL]);
    }
    command.arg(&test).args([
        "--exact",
        "two_processes_train_as_one_at_the_global_batch_and_resume_with_any_world_size",
        "--nocapture",
        "--test-threads=1",
    ]);
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot start mpirun ({e}): install OpenMPI with scripts/setup-mpi.sh"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for rank in 0..n {
        // (A failing rank may end the others before they get as far as the marker.)
        let marker = marker(run_file, rank, n);
        assert!(
            marker.exists() || end == End::Failed,
            "rank {rank} of {n} did not run:\n{stderr}"
        );
        let _ = std::fs::remove_file(marker);
    }
    if output.status.success() != (end == End::Clean) {
        panic!(
            "mpirun -np {n} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            stderr
        );
    }
    stderr.into_owned()
}

fn checkpoint(run: &Path) -> (Progress, BTreeMap<String, Tensor>) {
    let config = RunConfig::from_file(run).unwrap();
    read_checkpoint(&config.output.join("checkpoint.safetensors")).unwrap()
}

/// The largest difference between two checkpoints' tensors, relative to the
/// tensor's scale, and the tensor where it is; the checkpoints must hold the same tensors.
fn largest_difference(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> (f64, String) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst = (0.0, String::new());
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.size(), y.size(), "{name}");
        let (x, y) = (without_key_bias(name, x), without_key_bias(name, y));
        let (x, y) = (&x, &y);
        let scale = x.abs().max().double_value(&[]).max(1e-3);
        let diff = (x - y).abs().max().double_value(&[]) / scale;
        if diff > worst.0 {
            worst = (diff, name.clone());
        }
    }
    worst
}

/// An attention's `qkv.bias` without its key third (and so for its Adam
/// moments): adding a constant to every key leaves each query's softmax as
/// it was, so that bias's gradient is zero in exact arithmetic and only
/// rounding residue in float, which Adam's normalised steps turn into
/// ±lr moves of their own on each side. Other tensors as they are.
fn without_key_bias(name: &str, t: &Tensor) -> Tensor {
    if !name.ends_with("attn.qkv.bias") {
        return t.shallow_clone();
    }
    let third = t.size()[0] / 3;
    Tensor::cat(&[t.narrow(0, 0, third), t.narrow(0, 2 * third, third)], 0)
}

/// The log's training and validation lines: (split, stage, epoch, step, loss).
fn log(run: &Path) -> Vec<(String, usize, usize, u64, Option<f64>)> {
    let config = RunConfig::from_file(run).unwrap();
    std::fs::read_to_string(config.output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let m: MetricsLine = serde_json::from_str(l).unwrap();
            (m.split, m.stage, m.epoch, m.global_step, m.loss)
        })
        .collect()
}

/// Float tolerance, of each tensor's largest magnitude: two processes sum
/// each batch in two halves, one process in one go (measured: at most
/// 2e-4 after 9 steps, most tensors below 5e-5).
const TOLERANCE: f64 = 1e-3;

fn assert_same_run(whole: &Path, other: &Path, what: &str) {
    let (pa, a) = checkpoint(whole);
    let (pb, b) = checkpoint(other);
    assert_eq!(pa.global_step, pb.global_step, "{what}");
    assert_eq!((pa.stage, pa.epoch, pa.batch), (pb.stage, pb.epoch, pb.batch), "{what}");
    let (diff, name) = largest_difference(&a, &b);
    eprintln!("{what}: largest relative difference {diff:.2e} ({name})");
    assert!(diff < TOLERANCE, "{what}: {name} differs by {diff:.2e} of its scale");
    // The same log lines (one writer, no line twice), with the same losses.
    let (la, lb) = (log(whole), log(other));
    assert_eq!(la.len(), lb.len(), "{what}: {la:?}\n{lb:?}");
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!((&x.0, x.1, x.2, x.3), (&y.0, y.1, y.2, y.3), "{what}");
        if let (Some(p), Some(q)) = (x.4, y.4) {
            assert!(
                (p - q).abs() <= 1e-3 * p.abs().max(1.0),
                "{what}: logged loss {p} against {q}"
            );
        }
    }
}

#[test]
fn two_processes_train_as_one_at_the_global_batch_and_resume_with_any_world_size() {
    if run_as_rank() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("frankensplit-distributed-{}", std::process::id()));
    small_data(&dir, 4);

    // One process, batch 4.
    let one = run_file(&dir, "one");
    let summary = train(&RunConfig::from_file(&one).unwrap(), &options(None, false)).unwrap();
    assert_eq!((summary.progress.global_step, summary.progress.stage), (9, 3));

    // Two processes, 2 samples each.
    let two = run_file(&dir, "two");
    mpirun(2, &two, None, false, End::Clean);
    assert_same_run(&one, &two, "2 processes × 2 against 1 × 4");
    // Rank 0 wrote the bundle and teacher as one process does.
    let two_out = RunConfig::from_file(&two).unwrap().output;
    assert!(two_out.join("bundle/model.toml").exists() && two_out.join("teacher.safetensors").exists());

    // Two processes killed after step 4's checkpoint (inside stage 1), resumed with two, and with one.
    for (name, resumed_with) in [("killed-two", 2), ("killed-two-then-one", 1)] {
        let run = run_file(&dir, name);
        mpirun(2, &run, Some(4), false, End::Killed);
        assert_eq!(checkpoint(&run).0.global_step, 4);
        if resumed_with == 1 {
            train(&RunConfig::from_file(&run).unwrap(), &options(None, true)).unwrap();
        } else {
            mpirun(2, &run, None, true, End::Clean);
        }
        assert_same_run(
            &one,
            &run,
            &format!("{name}: killed at step 4, resumed with {resumed_with}"),
        );
    }

    // One process stopped after step 2, resumed with two.
    let run = run_file(&dir, "one-then-two");
    train(&RunConfig::from_file(&run).unwrap(), &options(Some(2), false)).unwrap();
    mpirun(2, &run, None, true, End::Clean);
    assert_same_run(&one, &run, "one-then-two: stopped at step 2, resumed with 2");

    // Starting over a finished run without --resume fails on rank 0, which ends rank 1 too (no hang).
    let stderr = mpirun(2, &two, None, false, End::Failed);
    assert!(
        stderr.contains("rank 0 of 2") && stderr.contains("--resume"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
