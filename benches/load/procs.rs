//! Where the CPU goes during a measured window: the CPU time (user + system, from
//! `/proc/PID/stat`) of each process taking part (Reach's instances, PostgreSQL and its backends,
//! the XMPP server, the mail sink, this bench's own load generators), and of the whole machine
//! (`/proc/stat`), so that what the others running on the shared machine took shows too.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK`; 100 on Linux).
fn ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Fields of `/proc/PID/stat` after the command name: (ppid, utime + stime, cutime + cstime).
fn stat(pid: u32) -> Option<(u32, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    // rest: " S ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    // cutime cstime ..." (fields 3.. of proc(5)).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    Some((num(1)? as u32, num(11)? + num(12)?, num(13)? + num(14)?))
}

/// Every process's parent, read once.
fn parents() -> HashMap<u32, u32> {
    let mut out = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                if let Some((ppid, _, _)) = stat(pid) {
                    out.insert(pid, ppid);
                }
            }
        }
    }
    out
}

/// `root` and all its descendants.
fn tree(root: u32, parents: &HashMap<u32, u32>) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, &pp)| pp == p).map(|(&c, _)| c));
        i += 1;
    }
    out
}

/// The process that listens on 127.0.0.1:`port` (or on every address), found through the
/// socket's inode in `/proc/net/tcp` and the processes' open files.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local = f.get(1)?;
        let (_, p) = local.split_once(':')?;
        (u16::from_str_radix(p, 16).ok()? == port && f.get(3) == Some(&"0A"))
            .then(|| f.get(9).map(|s| s.to_string()))
            .flatten()
    })?;
    let needle = format!("socket:[{inode}]");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == needle) {
                return Some(pid);
            }
        }
    }
    None
}

/// Busy and total ticks of the whole machine (all cores), from `/proc/stat`.
fn machine() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = text.lines().next().unwrap_or_default();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|s| s.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The CPU groups watched: a name and the root processes (each with its descendants).
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub roots: Vec<u32>,
    /// Whether the roots' descendants count too (PostgreSQL's backends), and what exited
    /// children used once reaped.
    pub descendants: bool,
}

impl Group {
    /// Processes `roots` and their descendants.
    pub fn new(name: &str, roots: impl IntoIterator<Item = u32>) -> Group {
        Group {
            name: name.to_owned(),
            roots: roots.into_iter().collect(),
            descendants: true,
        }
    }

    /// Processes `roots` alone (this bench: the servers it starts are its children).
    pub fn alone(name: &str, roots: impl IntoIterator<Item = u32>) -> Group {
        Group {
            descendants: false,
            ..Group::new(name, roots)
        }
    }
}

/// A snapshot of the groups' CPU ticks.
#[derive(Debug, Clone)]
pub struct Sample {
    at: Instant,
    ticks: Vec<u64>,
    /// Per group: each thread's (task id → name, ticks).
    threads: Vec<HashMap<u32, (String, u64)>>,
    machine: (u64, u64),
}

/// The threads of process `pid`: task id → (name, utime + stime).
fn threads_of(pid: u32) -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else {
            continue;
        };
        let name = text[open + 1..close].to_owned();
        let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        out.insert(tid, (name, num(11) + num(12)));
    }
    out
}

/// CPU used by each group between two samples.
#[derive(Debug, Clone)]
pub struct Usage {
    pub wall: Duration,
    /// (group, CPU seconds)
    pub groups: Vec<(String, f64)>,
    /// Per group, its busiest threads (name, CPU seconds), busiest first.
    pub threads: Vec<(String, Vec<(String, f64)>)>,
    /// CPU seconds of the whole machine, and how many cores it has.
    pub machine: f64,
    pub cores: usize,
}

pub struct Meter {
    groups: Vec<Group>,
}

impl Meter {
    /// Watches `groups` plus this bench process ("bench").
    pub fn new(mut groups: Vec<Group>) -> Meter {
        groups.push(Group::alone("bench", [std::process::id()]));
        Meter { groups }
    }

    pub fn sample(&self) -> Sample {
        let parents = parents();
        let threads = self
            .groups
            .iter()
            .map(|g| {
                let pids: Vec<u32> = if g.descendants {
                    g.roots.iter().flat_map(|&r| tree(r, &parents)).collect()
                } else {
                    g.roots.clone()
                };
                pids.into_iter().flat_map(threads_of).collect()
            })
            .collect();
        let ticks = self
            .groups
            .iter()
            .map(|g| {
                g.roots
                    .iter()
                    .map(|&root| {
                        if !g.descendants {
                            return stat(root).map_or(0, |s| s.1);
                        }
                        let own: u64 = tree(root, &parents)
                            .into_iter()
                            .filter_map(|p| stat(p).map(|s| s.1))
                            .sum();
                        // What exited children used, once reaped (short-lived helpers).
                        own + stat(root).map_or(0, |s| s.2)
                    })
                    .sum()
            })
            .collect();
        Sample {
            at: Instant::now(),
            ticks,
            threads,
            machine: machine(),
        }
    }

    pub fn usage(&self, a: &Sample, b: &Sample) -> Usage {
        let hz = ticks_per_second();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let wall = b.at - a.at;
        let groups = self
            .groups
            .iter()
            .zip(a.ticks.iter().zip(&b.ticks))
            .map(|(g, (x, y))| (g.name.clone(), y.saturating_sub(*x) as f64 / hz))
            .collect();
        let threads = self
            .groups
            .iter()
            .zip(a.threads.iter().zip(&b.threads))
            .map(|(g, (x, y))| {
                let mut busy: Vec<(String, f64)> = y
                    .iter()
                    .map(|(tid, (name, t))| {
                        let before = x.get(tid).map_or(0, |e| e.1);
                        (name.clone(), t.saturating_sub(before) as f64 / hz)
                    })
                    .filter(|(_, secs)| *secs > 0.0)
                    .collect();
                busy.sort_by(|p, q| q.1.total_cmp(&p.1));
                (g.name.clone(), busy)
            })
            .collect();
        // /proc/stat counts every core's ticks at USER_HZ.
        let machine = b.machine.0.saturating_sub(a.machine.0) as f64 / hz;
        Usage {
            wall,
            groups,
            threads,
            machine,
            cores,
        }
    }
}

impl Usage {
    /// "reach 0.61 + postgres 0.52 + prosody 0.97 + bench 0.21 + others 0.05 = 1.96 of 2 cores"
    pub fn cores_line(&self) -> String {
        let w = self.wall.as_secs_f64().max(1e-9);
        let known: f64 = self.groups.iter().map(|g| g.1).sum();
        let mut parts: Vec<String> = self
            .groups
            .iter()
            .map(|(n, s)| format!("{n} {:.2}", s / w))
            .collect();
        parts.push(format!("others {:.2}", (self.machine - known).max(0.0) / w));
        format!(
            "{} = {:.2} of {} cores",
            parts.join(" + "),
            self.machine / w,
            self.cores
        )
    }

    /// CPU microseconds per message of each group: "reach 95 µs, postgres 80 µs, ..., all
    /// but the bench 300 µs: at most 6.7k/s on 2 free cores".
    pub fn per_message_line(&self, messages: u64) -> String {
        let n = messages.max(1) as f64;
        let parts: Vec<String> = self
            .groups
            .iter()
            .map(|(name, s)| format!("{name} {:.0} µs", s * 1e6 / n))
            .collect();
        let served: f64 = self
            .groups
            .iter()
            .filter(|(name, _)| name != "bench")
            .map(|(_, s)| s)
            .sum::<f64>()
            / n;
        format!(
            "{}; all but the bench {:.0} µs: at most {:.0}/s on {} free cores",
            parts.join(", "),
            served * 1e6,
            self.cores as f64 / served.max(1e-12),
            self.cores
        )
    }

    /// "reach: tokio-runtime-w 0.31, reach-pg 0.10; postgres: postgres 0.40, ...": the `top`
    /// busiest threads (or processes) of each group, in cores.
    pub fn threads_line(&self, top: usize) -> String {
        let w = self.wall.as_secs_f64().max(1e-9);
        self.threads
            .iter()
            .filter(|(name, _)| name != "bench")
            .map(|(name, busy)| {
                let list: Vec<String> = busy
                    .iter()
                    .take(top)
                    .map(|(t, secs)| format!("{t} {:.2}", secs / w))
                    .collect();
                format!("{name}: {}", list.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}
