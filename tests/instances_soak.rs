//! Crash soak with several instances (issue 12): three `reach` processes under the names a, b
//! and c on one PostgreSQL database, behind one ejabberd 23.01 (which gives each stanza for the
//! component domain to one of their connections at random), the aiosmtpd relay, and Kannel with
//! its fake SMSC (the test holds the handset). One SMTP port and one webhook URL are in front of
//! the three instances (`support::balancer`, round-robin with fail-over, as a site's load
//! balancer). While a buddy writes to Alice every 70 ms and Alice switches between XMPP, email
//! and SMS and answers by email (through the SMTP balancer) and by SMS (through Kannel and the
//! webhook balancer), one instance at a time is killed with SIGKILL at random moments and
//! started again under its name after a random while (mostly 2–9 s, so that another instance
//! often takes over its outbox and claims first, sometimes within a second). Before 40% of the
//! kills the instance's own way to ejabberd is cut (a forwarder between them, 0.3–1.5 s
//! before), so that the replies it takes meanwhile wait in its outbox and the takeover has
//! stanzas to move. The other two keep serving. Then everything drains and the test counts,
//! per flow, what was sent, acknowledged, delivered, lost (must be 0) and duplicated, how often
//! items arrived out of order, and how long after each kill another instance took over what the
//! dead one left.
//!
//! Environment (all optional; the same names as `tests/soak.rs`):
//! - `REACH_SOAK_KILLS`: how many SIGKILLs (default 4: the short run of `scripts/test`;
//!   `scripts/soak-instances` runs 30+).
//! - `REACH_SOAK_SECONDS`: the least time the chaos lasts (default 30).
//! - `REACH_SOAK_SEED`: the random seed (printed in the report), to replay a run's choices.
//! - `REACH_SOAK_REPORT`: a file to write the report to (it is always printed too).
//! - `REACH_SOAK_KEEP`: set, the instances' logs and the trace are kept (as after a failure)
//!   in `$TMPDIR/reach-soak-instances-PID`.
//!
//! What counts as acknowledged, per flow:
//! - Buddy → Alice over XMPP. XEP-0114 has no acknowledgements, and ejabberd spreads one
//!   buddy's stanzas over the instances at random, so the single-instance inference of
//!   `tests/soak.rs` (every message of an epoch up to the last delivered one) does not hold:
//!   a later message delivered by b says nothing about an earlier one given to a. What still
//!   holds is per *incarnation* (one process of one instance, from its start to its SIGKILL or
//!   to the end of the run): its link reads stanzas in order, the runtime commits them in that
//!   order, and nothing leaves before its commit. Which incarnation read a stanza is known
//!   from its debug log (`inbound stanza … id=…`, written before the stanza is handled, and
//!   line by line, so it survives the SIGKILL). So a buddy message is *acknowledged* when the
//!   incarnation that read it (a) was never killed (it ran to the end, so it committed all it
//!   read), or (b) read a later buddy message that was delivered to Alice (by any route, sent
//!   by any instance): that one was committed, hence this one too. The rest that were not
//!   delivered are *in flight*, which DESIGN.md allows (no acks on XEP-0114): either read by an
//!   incarnation killed before its next commit, or never read at all (in a socket, or given by
//!   ejabberd to a connection that was just dying; the test fails if one of those was sent
//!   more than 2 s before any kill or link cut). A message the buddy got an error for is
//!   *refused* (the sender knows). An acknowledged message that never arrived is *lost*. No
//!   stanza may be read by two instances.
//! - Alice's email replies: acknowledged when the SMTP balancer relayed Reach's 250. The test
//!   retries like an MTA (same Message-ID) until it hears 250 or a 5xx; the balancer sends
//!   each connection to the next live instance.
//! - Alice's SMS replies: acknowledged once Kannel has them (the handset wrote them to the fake
//!   SMSC; Kannel is never stopped here), since Kannel retries its webhook call until an
//!   instance answers 200.
//!
//! Reordering: for the buddy's messages, among those sent while Alice's client was online (and
//! known to Reach for 500 ms) and delivered to that session of her client, how many arrived
//! after one sent later ("late"); for the replies, the same over their first arrivals at the
//! buddy in the order Alice sent them. Takeover: for each kill, the first line `took over what a
//! stopped instance left` naming the killed instance in another instance's log, its timestamp
//! minus the kill's.

use crate::support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use support::logs::strip_ansi;
use support::site::{Site, SiteOptions, INSTANCE_NAMES as NAMES};
use support::soak::{
    env_num, write_flow_table, write_phases, Conversation, Pace, ReplyRows, Route, Row,
};
use support::tokens::{reordering, token_number};

const T: Duration = Duration::from_secs(15);
/// A message never read by any instance is explained by a kill or a link cut at most this long
/// after it.
const KILL_WINDOW: Duration = Duration::from_secs(2);
/// How often a kill is preceded by a cut of the instance's link to ejabberd (0.3 to 1.5 s
/// before), so that its outbox holds what it took meanwhile (replies by email and SMS).
const CUT_FIRST: f64 = 0.4;

/// One process of one instance.
struct Incarnation {
    instance: usize,
    /// Its part of the instance's log: bytes `from..to` (to the end while it runs).
    from: usize,
    to: Option<usize>,
    killed: Option<(Instant, SystemTime)>,
    /// When its link to ejabberd was cut (before the kill).
    link_cut: Option<Instant>,
}

/// The time at the start of a log line (`2026-12-07T10:37:42.123456Z …`), as seconds since
/// the Unix epoch.
fn line_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The value of `key=value` in a log line (quotes removed).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[at..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

/// The site, the conversation kept going on it, and the processes each instance ran.
struct World {
    /// Three instances, each reaching ejabberd through a forwarder the test can cut; the relay
    /// and the phone belong to the conversation.
    site: Site,
    conversation: Conversation,
    /// When links were cut.
    cuts: Vec<Instant>,
    incarnations: Vec<Incarnation>,
    /// When each incarnation (by index) was started again after a kill.
    restarted_at: HashMap<usize, Instant>,
}

impl Drop for World {
    fn drop(&mut self) {
        // The site keeps the instances' logs and ejabberd's next to this trace.
        if std::thread::panicking() || std::env::var_os("REACH_SOAK_KEEP").is_some() {
            let keep = self.site.keep_logs_in();
            let _ = std::fs::create_dir_all(keep);
            let trace = self.conversation.ledger.trace.join("\n");
            let _ = std::fs::write(keep.join("trace.txt"), trace);
        }
    }
}

impl World {
    async fn new(seed: u64) -> World {
        let mut site = Site::new(SiteOptions {
            instances: NAMES.len(),
            email: true,
            sms: true,
            cuttable_links: NAMES.len(),
            digest_secs: 1,
            sms_daily_cap: 100_000,
            sms_per_second: Some(100),
            link_up_within: T,
            keep_logs_in: Some(
                std::env::temp_dir().join(format!("reach-soak-instances-{}", std::process::id())),
            ),
            keep_logs_always: std::env::var_os("REACH_SOAK_KEEP").is_some(),
            ..SiteOptions::default()
        })
        .await;
        let phone = site.phone.take().expect("the site's handset");
        let sink = site.sink.take().expect("the site's relay");
        let smtp_port = site.smtp().port();
        let conversation =
            Conversation::new(&site.server, phone, sink, smtp_port, seed, true).await;
        let incarnations = (0..NAMES.len())
            .map(|instance| Incarnation {
                instance,
                from: 0,
                to: None,
                killed: None,
                link_cut: None,
            })
            .collect();
        World {
            site,
            conversation,
            cuts: Vec::new(),
            incarnations,
            restarted_at: HashMap::new(),
        }
    }

    /// Cuts instance `i` off from ejabberd (its link goes down and cannot come back).
    fn cut_link(&mut self, i: usize) {
        self.site.cut_link(i);
        self.cuts.push(Instant::now());
        if let Some(inc) = self
            .incarnations
            .iter_mut()
            .rev()
            .find(|inc| inc.instance == i)
        {
            inc.link_cut = Some(Instant::now());
        }
        self.conversation
            .ledger
            .trace(format!("cut {}'s link", NAMES[i]));
    }

    fn kill(&mut self, i: usize) {
        let instance = &mut self.site.instances[i];
        instance.kill();
        let (now, wall) = (Instant::now(), SystemTime::now());
        let len = instance.log_len();
        let inc = self
            .incarnations
            .iter_mut()
            .rev()
            .find(|inc| inc.instance == i)
            .expect("an incarnation");
        inc.to = Some(len);
        inc.killed = Some((now, wall));
        self.conversation.ledger.trace(format!("kill {}", NAMES[i]));
    }

    async fn restart(&mut self, i: usize) {
        self.site.mend_link(i);
        let instance = &mut self.site.instances[i];
        instance.start_again().await;
        self.incarnations.push(Incarnation {
            instance: i,
            from: instance.log_from,
            to: None,
            killed: None,
            link_cut: None,
        });
        self.restarted_at
            .insert(self.incarnations.len() - 1, Instant::now());
        self.conversation
            .ledger
            .trace(format!("restart {}", NAMES[i]));
    }

    /// Each incarnation's part of its instance's log, colours removed.
    fn incarnation_logs(&self) -> Vec<String> {
        let logs: Vec<Vec<u8>> = self
            .site
            .instances
            .iter()
            .map(|i| std::fs::read(i.log_path()).unwrap_or_default())
            .collect();
        self.incarnations
            .iter()
            .map(|inc| {
                let log = &logs[inc.instance];
                let to = inc.to.unwrap_or(log.len()).min(log.len());
                strip_ansi(&String::from_utf8_lossy(&log[inc.from.min(to)..to]))
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_lose_nothing_acknowledged_across_sigkills() {
    let kills = env_num("REACH_SOAK_KILLS", 4) as usize;
    let min_secs = env_num("REACH_SOAK_SECONDS", 30);
    let seed = env_num("REACH_SOAK_SEED", rand::random::<u32>() as u64);
    let started = Instant::now();
    let mut w = World::new(seed).await;
    w.conversation.setup_alice(&w.site.server).await;
    let setup_time = started.elapsed();

    let mut pace = Pace::start();
    let mut killed = 0usize;
    let mut down: Option<(usize, Instant)> = None;
    // An instance whose link was cut, and when it is to be killed.
    let mut cut: Option<(usize, Instant)> = None;
    let mut next_kill =
        Instant::now() + Duration::from_millis(w.conversation.rng.gen_range(1000..3000));
    let chaos_start = Instant::now();
    while killed < kills
        || down.is_some()
        || cut.is_some()
        || chaos_start.elapsed() < Duration::from_secs(min_secs)
    {
        let now = Instant::now();
        pace.step(&mut w.conversation, &w.site.server, now).await;
        let rng = &mut w.conversation.rng;
        match (down, cut) {
            (None, None) if killed < kills && now >= next_kill => {
                let i = rng.gen_range(0..NAMES.len());
                if rng.gen_bool(CUT_FIRST) {
                    // Its link goes first: what it takes meanwhile waits in its outbox.
                    let at = now + Duration::from_millis(rng.gen_range(300..1500));
                    w.cut_link(i);
                    cut = Some((i, at));
                } else {
                    next_kill = now;
                    cut = Some((i, now));
                }
            }
            (None, Some((i, at))) if now >= at => {
                cut = None;
                w.kill(i);
                killed += 1;
                // Mostly long enough for another instance's watch (every 5 s) to take over,
                // sometimes back within a second.
                let rng = &mut w.conversation.rng;
                let back = if rng.gen_bool(0.2) {
                    rng.gen_range(200..1000)
                } else {
                    rng.gen_range(2000..9000)
                };
                down = Some((i, Instant::now() + Duration::from_millis(back)));
            }
            (Some((i, at)), _) if now >= at => {
                w.restart(i).await;
                down = None;
                next_kill =
                    Instant::now() + Duration::from_millis(w.conversation.rng.gen_range(500..3000));
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let chaos_time = chaos_start.elapsed();

    // Drain: no new traffic; all instances up.
    let drain_time = w.conversation.drain(&w.site.server, kills).await;

    // ---- counting: the buddy's messages ----
    let logs = w.incarnation_logs();
    let l = &w.conversation.ledger;
    let by_id: HashMap<&str, usize> = l
        .bob
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id.as_str(), i))
        .collect();
    // Which incarnation read each message, and where in its reading order.
    let mut read_by: Vec<Vec<(usize, usize)>> = vec![Vec::new(); l.bob.len()];
    let mut reads: Vec<Vec<usize>> = vec![Vec::new(); logs.len()];
    for (inc, log) in logs.iter().enumerate() {
        for line in log.lines().filter(|l| l.contains("inbound stanza")) {
            // `id=Some("b-msg-7")` (the first quoted string after `id=`).
            let Some(id) = line
                .find(" id=")
                .and_then(|at| line[at..].split('"').nth(1))
            else {
                continue;
            };
            if let Some(&m) = by_id.get(id) {
                read_by[m].push((inc, reads[inc].len()));
                reads[inc].push(m);
            }
        }
    }
    let delivered = |m: usize| l.at_alice.contains_key(&l.bob[m].token);
    // The last position, per incarnation, of a message it read that was delivered.
    let last_delivered: Vec<Option<usize>> = reads
        .iter()
        .map(|r| r.iter().rposition(|&m| delivered(m)))
        .collect();
    let kill_times: Vec<Instant> = w
        .incarnations
        .iter()
        .filter_map(|inc| inc.killed.map(|k| k.0))
        .chain(w.cuts.iter().copied())
        .collect();
    let mut xmpp = Row::default();
    let (mut read_twice, mut acked_by_survivor, mut acked_by_later) = (0, 0, 0);
    let (mut flight_read, mut flight_unread, mut unexplained) = (0, 0, Vec::new());
    let mut lost = Vec::new();
    let mut routes: BTreeMap<Route, usize> = BTreeMap::new();
    let mut per_instance = vec![0usize; NAMES.len()];
    for (m, msg) in l.bob.iter().enumerate() {
        xmpp.sent += 1;
        let copies = l.at_alice.get(&msg.token);
        if let Some(copies) = copies {
            xmpp.delivered += 1;
            xmpp.duplicates += copies.len() - 1;
            *routes.entry(copies[0]).or_default() += 1;
        }
        if read_by[m].len() > 1 {
            read_twice += 1;
        }
        if let Some(&(inc, _)) = read_by[m].first() {
            per_instance[w.incarnations[inc].instance] += 1;
        }
        if l.bob_errors.contains_key(&msg.id) {
            xmpp.refused += 1;
            continue;
        }
        let acked = read_by[m].iter().any(|&(inc, pos)| {
            let survivor = w.incarnations[inc].killed.is_none();
            let later = last_delivered[inc].is_some_and(|last| pos <= last);
            if survivor {
                acked_by_survivor += 1;
            } else if later {
                acked_by_later += 1;
            }
            survivor || later
        });
        if acked {
            xmpp.acked += 1;
            if copies.is_none() {
                xmpp.lost += 1;
                lost.push(msg.token.clone());
            }
        } else if copies.is_none() {
            xmpp.in_flight += 1;
            if read_by[m].is_empty() {
                flight_unread += 1;
                let near_kill = kill_times
                    .iter()
                    .any(|&k| k >= msg.sent_at && k - msg.sent_at <= KILL_WINDOW);
                if !near_kill {
                    unexplained.push(msg.token.clone());
                }
            } else {
                flight_read += 1;
            }
        }
    }
    // Reordering at Alice's client: messages sent while she was online, in that session.
    let mut session_of: HashMap<u64, usize> = HashMap::new();
    for msg in &l.bob {
        if let Some(s) = msg.session {
            session_of.insert(msg.n, s);
        }
    }
    let mut by_session: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    let mut first_copy = HashSet::new();
    for &(s, n) in &l.xmpp_arrivals {
        if session_of.get(&n) == Some(&s) && first_copy.insert(n) {
            by_session.entry(s).or_default().push(n);
        }
    }
    let mut farthest_xmpp = 0;
    for arrivals in by_session.values() {
        let (late, far) = reordering(arrivals);
        xmpp.late += late;
        xmpp.ordered_of += arrivals.len();
        farthest_xmpp = farthest_xmpp.max(far);
    }

    // ---- the replies ----
    let ReplyRows {
        mut mail,
        mail_attempts,
        mail_lost,
        mut sms,
        sms_lost,
    } = w.conversation.reply_rows();
    for (row, prefix) in [(&mut mail, "mail"), (&mut sms, "sms")] {
        let order: Vec<u64> = l
            .bob_arrivals
            .iter()
            .filter(|t| t.starts_with(&format!("{prefix}-")))
            .map(|t| token_number(t))
            .collect();
        row.late = reordering(&order).0;
        row.ordered_of = order.len();
    }
    let conditions = w.conversation.error_conditions();

    // ---- takeovers: how long after each kill another instance took over ----
    struct Takeover {
        by: &'static str,
        delay: f64,
        stanzas: usize,
        claims: usize,
    }
    let mut takeover_lines: Vec<(usize, f64, &'static str, usize, usize)> = Vec::new();
    for (inc, log) in logs.iter().enumerate() {
        let by = NAMES[w.incarnations[inc].instance];
        for line in log
            .lines()
            .filter(|l| l.contains("took over what a stopped instance left"))
        {
            let (Some(name), Some(at)) = (field(line, "instance"), line_time(line)) else {
                continue;
            };
            let Some(of) = NAMES.iter().position(|n| *n == name) else {
                continue;
            };
            let stanzas = field(line, "stanzas")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let claims = field(line, "claims")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            takeover_lines.push((of, at, by, stanzas, claims));
        }
    }
    let mut takeovers: Vec<Option<Takeover>> = Vec::new();
    let kills_list: Vec<(usize, f64)> = w
        .incarnations
        .iter()
        .filter_map(|inc| inc.killed.map(|k| (inc.instance, unix(k.1))))
        .collect();
    let cut_before: Vec<Option<f64>> = w
        .incarnations
        .iter()
        .filter_map(|inc| {
            let (at, _) = inc.killed?;
            Some(inc.link_cut.map(|c| (at - c).as_secs_f64()))
        })
        .collect();
    // How long each killed instance stayed down: until the next incarnation of it started.
    let down_for: Vec<f64> = w
        .incarnations
        .iter()
        .enumerate()
        .filter_map(|(n, inc)| {
            let (at, _) = inc.killed?;
            let back = w.incarnations[n + 1..]
                .iter()
                .position(|later| later.instance == inc.instance)
                .and_then(|k| w.restarted_at.get(&(n + 1 + k)).copied());
            Some(back.map_or(f64::NAN, |b| (b - at).as_secs_f64()))
        })
        .collect();
    let mut empty_takeovers = 0;
    for (k, &(instance, at)) in kills_list.iter().enumerate() {
        let next_kill_of_same = kills_list[k + 1..]
            .iter()
            .find(|(i, _)| *i == instance)
            .map_or(f64::MAX, |(_, t)| *t);
        // Usually one line; another instance looking at the same moment may log an empty
        // takeover just after the real one.
        let lines: Vec<&(usize, f64, &'static str, usize, usize)> = takeover_lines
            .iter()
            .filter(|(of, t, ..)| *of == instance && *t >= at - 0.01 && *t < next_kill_of_same)
            .collect();
        empty_takeovers += lines.len().saturating_sub(1);
        let earliest = lines.iter().map(|l| l.1).min_by(f64::total_cmp);
        let main = lines
            .iter()
            .max_by(|a, b| (a.3 + a.4).cmp(&(b.3 + b.4)).then(b.1.total_cmp(&a.1)));
        takeovers.push(earliest.zip(main).map(|(t, main)| Takeover {
            by: main.2,
            delay: t - at,
            stanzas: lines.iter().map(|l| l.3).sum(),
            claims: lines.iter().map(|l| l.4).sum(),
        }));
    }
    let mut delays: Vec<f64> = takeovers.iter().flatten().map(|t| t.delay).collect();
    delays.sort_by(f64::total_cmp);
    let moved: usize = takeovers.iter().flatten().map(|t| t.stanzas).sum();
    let released: usize = takeovers.iter().flatten().map(|t| t.claims).sum();
    let adopters: BTreeMap<&str, usize> =
        takeovers
            .iter()
            .flatten()
            .fold(BTreeMap::new(), |mut m, t| {
                *m.entry(t.by).or_default() += 1;
                m
            });

    // ---- the report ----
    let mut report = String::new();
    let r = &mut report;
    use std::fmt::Write;
    let _ = writeln!(
        r,
        "Reach soak with {} instances on PostgreSQL behind ejabberd (seed {seed}): {killed} SIGKILLs, one instance down at a time",
        NAMES.len()
    );
    write_phases(r, setup_time, chaos_time, drain_time, started);
    write_flow_table(
        r,
        "arrived after a later one",
        [&xmpp, &mail, &sms],
        |row| format!("{} of {}", row.late, row.ordered_of),
    );
    let _ = writeln!(
        r,
        "buddy messages: read per instance {:?} (a b c), read twice {read_twice}; acknowledged as read by a process that ran to the end {acked_by_survivor}, by a later delivered one {acked_by_later}; in flight: read by a process killed before its commit {flight_read}, never read {flight_unread} (of which not within {} s before a kill: {}); first delivered by XMPP {}, email {}, SMS {}; farthest reordering at Alice's client {farthest_xmpp} places",
        per_instance,
        KILL_WINDOW.as_secs(),
        unexplained.len(),
        routes.get(&Route::Xmpp).unwrap_or(&0),
        routes.get(&Route::Email).unwrap_or(&0),
        routes.get(&Route::Sms).unwrap_or(&0),
    );
    let _ = writeln!(
        r,
        "replies: {} SMTP attempts for {} email replies (through the balancer: connections per instance {:?}); SMS webhook connections per instance {:?}; errors the buddy got: {conditions:?}",
        mail_attempts,
        mail.sent,
        w.site.smtp().served(),
        w.site.webhook().served(),
    );
    let median = delays.get(delays.len() / 2).copied().unwrap_or(f64::NAN);
    let _ = writeln!(
        r,
        "takeovers: {} of {killed} kills taken over by another instance before the restart (by {adopters:?}), {} back first; delay after the kill: min {:.2} s, median {:.2} s, max {:.2} s; stanzas moved {moved}, claims released {released} (empty takeovers logged by a second instance: {empty_takeovers})",
        delays.len(),
        killed - delays.len(),
        delays.first().copied().unwrap_or(f64::NAN),
        median,
        delays.last().copied().unwrap_or(f64::NAN),
    );
    for (k, ((instance, _), takeover)) in kills_list.iter().zip(&takeovers).enumerate() {
        let _ = writeln!(
            r,
            "kill {}: {}{} down {:.1} s; {}",
            k + 1,
            NAMES[*instance],
            match cut_before.get(k).copied().flatten() {
                Some(c) => format!(" (its link cut {c:.1} s before)"),
                None => String::new(),
            },
            down_for.get(k).copied().unwrap_or(f64::NAN),
            match takeover {
                Some(t) => format!(
                    "taken over by {} {:.2} s after the kill (stanzas {}, claims {})",
                    t.by, t.delay, t.stanzas, t.claims
                ),
                None => "back before a takeover".to_owned(),
            }
        );
    }
    println!("\n{report}");
    if let Ok(path) = std::env::var("REACH_SOAK_REPORT") {
        let _ = std::fs::write(Path::new(&path), &report);
    }

    assert_eq!(killed, kills);
    assert!(
        xmpp.lost == 0 && mail.lost == 0 && sms.lost == 0,
        "acknowledged items were lost:\n{report}\nXMPP: {lost:?}\nemail replies: {mail_lost:?}\nSMS replies: {sms_lost:?}"
    );
    assert_eq!(read_twice, 0, "a stanza read by two instances:\n{report}");
    assert!(
        unexplained.is_empty(),
        "buddy messages never read by any instance, with no kill near them: {unexplained:?}\n{report}"
    );
    assert_eq!(mail.refused, 0, "a reply was refused with 5xx:\n{report}");
    assert!(
        xmpp.delivered > 0 && mail.delivered > 0 && sms.delivered > 0,
        "every flow carried something:\n{report}"
    );
}
