//! The test bed: three network namespaces, a client, a router and a
//! server, joined by two veth pairs. The kernel shapes each direction with a
//! `tbf` qdisc on the sending end's veth (the client's for the uplink, the
//! server's for the downlink): the queue and the rate the sender's TCP
//! feels. The router sends every forwarded packet through the
//! [`DelayStage`], which serialises it at the same rate (so that the
//! bucket's burst does not let a short request cross for free), then adds
//! the round trip and the loss. Everything is
//! made with iproute2 (`ip`, `tc`) and removed when the bed is dropped.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::stage::{DelayStage, StageCounts, StageSettings};
use crate::{Error, Result};

/// The client's address; its network is 10.201.1.0/24.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
/// The server's address; its network is 10.201.2.0/24.
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 2);
const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
const ROUTER_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 1);
/// The routing table that sends forwarded packets into the stage.
const STAGE_TABLE: &str = "100";
/// Interface names, the same in every bed (each namespace has its own).
const CLIENT_IF: &str = "c0";
const SERVER_IF: &str = "s0";
const ROUTER_CLIENT_IF: &str = "rc0";
const ROUTER_SERVER_IF: &str = "rs0";
const STAGE_IF: &str = "stage0";

/// A link as the bed emulates it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSettings {
    /// Client → server rate, bits per second.
    pub uplink_bits_per_s: f64,
    /// Server → client rate, bits per second.
    pub downlink_bits_per_s: f64,
    /// Round-trip time added by the stage (half each way).
    pub rtt: Duration,
    /// Probability that a packet is lost, each direction.
    pub loss: f64,
}

/// Why the bed cannot run here, or `None` when it can: it needs root,
/// iproute2's `ip` and `tc`, and `/dev/net/tun`.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("emulated links need root (network namespaces, qdiscs and a TUN device)".into());
    }
    for tool in ["ip", "tc"] {
        let found = Command::new(tool).arg("-V").output().is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("emulated links need iproute2's `{tool}` on the PATH"));
        }
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("emulated links need /dev/net/tun".into());
    }
    None
}

/// Three namespaces and the stage between them.
pub struct Testbed {
    prefix: String,
    stage: Option<DelayStage>,
}

impl Testbed {
    /// Makes the namespaces `<prefix>-c`, `<prefix>-r` and `<prefix>-s`
    /// (any left by an earlier bed of that name are removed first), their
    /// links and routes, and starts the stage with no delay and no loss.
    pub fn create(prefix: &str) -> Result<Self> {
        if prefix.is_empty() || prefix.len() > 24 || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(Error::Stage(format!(
                "namespace prefix {prefix:?}: 1-24 letters, digits or '-'"
            )));
        }
        let mut bed = Self {
            prefix: prefix.to_string(),
            stage: None,
        };
        bed.remove_namespaces();
        let (c, r, s) = (bed.client_ns(), bed.router_ns(), bed.server_ns());
        for ns in [&c, &r, &s] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for (end, end_ns, peer, end_addr, peer_addr) in [
            (CLIENT_IF, &c, ROUTER_CLIENT_IF, CLIENT_ADDR, ROUTER_CLIENT_SIDE),
            (SERVER_IF, &s, ROUTER_SERVER_IF, SERVER_ADDR, ROUTER_SERVER_SIDE),
        ] {
            ip(&[
                "link", "add", end, "netns", end_ns, "type", "veth", "peer", "name", peer, "netns", &r,
            ])?;
            ip(&["-n", end_ns, "addr", "add", &format!("{end_addr}/24"), "dev", end])?;
            ip(&["-n", &r, "addr", "add", &format!("{peer_addr}/24"), "dev", peer])?;
            ip(&["-n", end_ns, "link", "set", end, "up"])?;
            ip(&["-n", &r, "link", "set", peer, "up"])?;
            ip(&["-n", end_ns, "route", "add", "default", "via", &peer_addr.to_string()])?;
        }
        // The router forwards, and accepts packets coming back from the
        // stage from addresses its routes place on the veths.
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            sysctl(&r, key)?;
        }
        let stage = DelayStage::start(
            &PathBuf::from("/run/netns").join(&r),
            STAGE_IF,
            (Ipv4Addr::new(10, 201, 2, 0), 24),
        )?;
        bed.stage = Some(stage);
        sysctl(&r, &format!("net.ipv4.conf.{STAGE_IF}.rp_filter=0"))?;
        ip(&["-n", &r, "link", "set", STAGE_IF, "up"])?;
        // What arrives on a veth goes to the stage; what the stage gives
        // back arrives on its device and takes the main table's routes.
        for iface in [ROUTER_CLIENT_IF, ROUTER_SERVER_IF] {
            ip(&["-n", &r, "rule", "add", "iif", iface, "lookup", STAGE_TABLE])?;
        }
        ip(&[
            "-n",
            &r,
            "route",
            "add",
            "default",
            "dev",
            STAGE_IF,
            "table",
            STAGE_TABLE,
        ])?;
        Ok(bed)
    }

    /// The client's namespace.
    pub fn client_ns(&self) -> String {
        format!("{}-c", self.prefix)
    }

    /// The router's namespace.
    pub fn router_ns(&self) -> String {
        format!("{}-r", self.prefix)
    }

    /// The server's namespace.
    pub fn server_ns(&self) -> String {
        format!("{}-s", self.prefix)
    }

    /// Shapes both directions and sets the stage's delay and loss (its loss
    /// generator seeded with `seed`).
    pub fn configure(&self, link: &LinkSettings, seed: u64) -> Result<()> {
        for (ns, iface, rate) in [
            (self.client_ns(), CLIENT_IF, link.uplink_bits_per_s),
            (self.server_ns(), SERVER_IF, link.downlink_bits_per_s),
        ] {
            shape(&ns, iface, rate)?;
        }
        let settings = StageSettings {
            uplink_bits_per_s: link.uplink_bits_per_s,
            downlink_bits_per_s: link.downlink_bits_per_s,
            ..StageSettings::symmetric(f64::INFINITY, link.rtt, link.loss)
        };
        self.stage().configure(settings, seed)
    }

    /// A command that runs `program` in the client's namespace.
    pub fn in_client(&self, program: &std::path::Path) -> Command {
        in_namespace(&self.client_ns(), program)
    }

    /// A command that runs `program` in the server's namespace.
    pub fn in_server(&self, program: &std::path::Path) -> Command {
        in_namespace(&self.server_ns(), program)
    }

    /// Runs `work` on a thread inside the client's namespace.
    pub fn as_client<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        within(&self.client_ns(), work)
    }

    /// Runs `work` on a thread inside the server's namespace.
    pub fn as_server<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        within(&self.server_ns(), work)
    }

    /// Bytes the client's interface has sent and received (IP packets with
    /// their Ethernet headers, as the qdiscs count them).
    pub fn client_bytes(&self) -> Result<(u64, u64)> {
        let ns = self.client_ns();
        let read = |counter: &str| -> Result<u64> {
            let path = format!("/sys/class/net/{CLIENT_IF}/statistics/{counter}");
            let out = run(Command::new("ip").args(["netns", "exec", &ns, "cat", &path]))?;
            out.trim().parse().map_err(|e| Error::Stage(format!("{path}: {e}")))
        };
        Ok((read("tx_bytes")?, read("rx_bytes")?))
    }

    /// Packets the stage has forwarded and dropped.
    pub fn stage_counts(&self) -> StageCounts {
        self.stage().counts()
    }

    fn stage(&self) -> &DelayStage {
        self.stage.as_ref().expect("a created bed has its stage")
    }

    fn remove_namespaces(&self) {
        for ns in [self.client_ns(), self.router_ns(), self.server_ns()] {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // The stage first: its device goes with its file descriptor.
        self.stage = None;
        self.remove_namespaces();
    }
}

/// A token bucket at `rate` on `iface`'s egress: a bucket of one full
/// frame (so that the rate holds from the first packet) or a millisecond of
/// the rate when that is more (the timer's grain at high rates), and a queue
/// of half a second of the rate, at least 64 KiB.
fn shape(ns: &str, iface: &str, bits_per_s: f64) -> Result<()> {
    if !(bits_per_s.is_finite() && bits_per_s >= 8_000.0) {
        return Err(Error::Stage(format!("rate {bits_per_s} bit/s: at least 8 kbit/s")));
    }
    let bytes_per_s = bits_per_s / 8.0;
    let burst = (bytes_per_s / 1000.0).max(1600.0).round() as u64;
    let limit = (bytes_per_s * 0.5).max(65_536.0).round() as u64;
    tc(&[
        "-n",
        ns,
        "qdisc",
        "replace",
        "dev",
        iface,
        "root",
        "tbf",
        "rate",
        &format!("{}bit", bits_per_s.round() as u64),
        "burst",
        &burst.to_string(),
        "limit",
        &limit.to_string(),
    ])
}

/// Runs `work` on a new thread that has entered the namespace `ns`.
fn within<T: Send + 'static>(ns: &str, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || crate::stage::enter(&path).map(|()| work()))
        .join()
        .map_err(|_| Error::Stage("a thread inside a namespace panicked".into()))?
}

fn in_namespace(ns: &str, program: &std::path::Path) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns]).arg(program);
    command
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

fn tc(args: &[&str]) -> Result<()> {
    run(Command::new("tc").args(args)).map(drop)
}

fn sysctl(ns: &str, setting: &str) -> Result<()> {
    ip(&["netns", "exec", ns, "sysctl", "-q", "-w", setting])
}

fn run(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}").replace('"', "");
    let out = command.output().map_err(|e| Error::Command {
        command: shown.clone(),
        message: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: shown,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
