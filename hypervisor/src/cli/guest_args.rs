//! The built-in guests' own options on `snapvisor run`: `--mode` (memfill's and netping's) and
//! netping's addresses, count and frame size. Each is refused, with the option named, for a
//! guest that does not read it.

use clap::Args;

use super::CliError;
use crate::guests::netping::{self, NetMode, NetParams};
use crate::guests::{Builtin, MemfillMode};

/// Every built-in guest's `--mode` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestMode {
    /// memfill: fill RAM with each pass's pattern (its default).
    Fill,
    /// memfill: only check the pattern of --seed.
    Verify,
    /// netping: ARP for the --ping peer, then ICMP echo requests (its default).
    Ping,
    /// netping: answer ARP and pings for --guest-ip, reflect every other frame.
    Echo,
    /// netping: post malformed descriptor chains, report the device status.
    Evil,
    /// netping: send --count frames of --frame-size bytes as fast as the ring allows.
    Tx,
    /// netping: count received frames.
    Rx,
}

impl GuestMode {
    fn name(self) -> &'static str {
        match self {
            GuestMode::Fill => "fill",
            GuestMode::Verify => "verify",
            GuestMode::Ping => "ping",
            GuestMode::Echo => "echo",
            GuestMode::Evil => "evil",
            GuestMode::Tx => "tx",
            GuestMode::Rx => "rx",
        }
    }
}

/// netping's options (on the command line, and with the same names in the API's VM
/// definition, under `netping`).
#[derive(Clone, Debug, Args, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetpingArgs {
    /// netping: the guest's address and prefix, like 10.77.0.2/24 (a host address of that
    /// subnet: not its network or broadcast address).
    #[arg(long, value_name = "ADDR/PREFIX")]
    pub guest_ip: Option<String>,
    /// netping (ping mode): the peer to ping, on the guest's subnet.
    #[arg(long, value_name = "ADDR")]
    pub ping: Option<String>,
    /// netping: replies to wait for (ping, default 5), frames to answer (echo), send (tx,
    /// default 100000) or receive (rx); 0 = no limit (not for tx).
    #[arg(long)]
    pub count: Option<u64>,
    /// netping tx: Ethernet frame size in bytes without FCS (60..=1514, default 1514).
    #[arg(long)]
    pub frame_size: Option<u64>,
    /// netping ping: milliseconds between a reply and the next request (default 0, at most
    /// 60000).
    #[arg(long)]
    pub ping_interval_ms: Option<u64>,
}

/// The API's `netping` object: [`NetpingArgs`] plus the mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetpingDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<GuestMode>,
    #[serde(flatten)]
    pub args: NetpingArgs,
}

fn input(msg: String) -> CliError {
    CliError::Input(msg)
}

fn parse_ip(option: &str, s: &str) -> Result<[u8; 4], CliError> {
    s.parse::<std::net::Ipv4Addr>()
        .map(|a| a.octets())
        .map_err(|_| input(format!("{option} {s}: not an IPv4 address like 10.77.0.2")))
}

/// The longest `--ping-interval-ms`: the guest turns it into TSC ticks (ms times the TSC's
/// rate), which must not overflow, and a minute between pings is already more than a test or
/// a benchmark waits.
pub const MAX_PING_INTERVAL_MS: u64 = 60_000;

/// Checks that `ip` (given as `text` for `option`) can be a host's address on a /`prefix`
/// subnet: not the subnet's network or broadcast address, and not an address no host has
/// (0.0.0.0/8, loopback, multicast, reserved and the limited broadcast).
fn check_host_address(option: &str, text: &str, ip: [u8; 4], prefix: u8) -> Result<(), CliError> {
    let addr = std::net::Ipv4Addr::from(ip);
    let kind = match ip[0] {
        0 => Some("in 0.0.0.0/8 (this network)"),
        127 => Some("a loopback address"),
        224..=239 => Some("a multicast address"),
        240..=255 => Some("a reserved or broadcast address"),
        _ => None,
    };
    if let Some(kind) = kind {
        return Err(input(format!("{option} {text}: {addr} is {kind}, not a host's address")));
    }
    let host_mask = u32::MAX >> prefix.min(32);
    let host = u32::from(addr) & host_mask;
    let what = if host == 0 {
        "network"
    } else if host == host_mask {
        "broadcast"
    } else {
        return Ok(());
    };
    let net = std::net::Ipv4Addr::from(u32::from(addr) & !host_mask);
    Err(input(format!("{option} {text}: {addr} is the {what} address of {net}/{prefix}, not a host's address")))
}

/// memfill's mode from `--mode`; an error for netping's modes.
pub fn memfill_mode(mode: Option<GuestMode>) -> Result<MemfillMode, CliError> {
    match mode {
        None | Some(GuestMode::Fill) => Ok(MemfillMode::Fill),
        Some(GuestMode::Verify) => Ok(MemfillMode::Verify),
        Some(m) => Err(input(format!("--mode {}: memfill's modes are fill and verify", m.name()))),
    }
}

impl NetpingArgs {
    /// The options given, by name.
    fn given(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (name, set) in [
            ("--guest-ip", self.guest_ip.is_some()),
            ("--ping", self.ping.is_some()),
            ("--count", self.count.is_some()),
            ("--frame-size", self.frame_size.is_some()),
            ("--ping-interval-ms", self.ping_interval_ms.is_some()),
        ] {
            if set {
                v.push(name);
            }
        }
        v
    }

    /// Checks the guest-specific options against the guest: `nics` is how many `--net` were
    /// given, `mem_mib` the guest's memory. Returns memfill's and netping's parameters.
    pub fn params(
        &self,
        guest: Option<Builtin>,
        mode: Option<GuestMode>,
        nics: usize,
        mem_mib: u64,
    ) -> Result<(MemfillMode, NetParams), CliError> {
        let what = guest.map_or_else(|| "a kernel or firmware VM".to_string(), |g| format!("--builtin {}", g.name()));
        if guest != Some(Builtin::Netping) {
            if let Some(opt) = self.given().first() {
                return Err(input(format!("{opt} is an option of --builtin netping, not of {what}")));
            }
            if guest == Some(Builtin::Memfill) {
                return Ok((memfill_mode(mode)?, NetParams::default()));
            }
            if let Some(m) = mode {
                return Err(input(format!(
                    "--mode {}: only --builtin memfill (fill, verify) and netping (ping, echo, evil, tx, rx) have modes, not {what}",
                    m.name()
                )));
            }
            return Ok((MemfillMode::Fill, NetParams::default()));
        }
        let mode = match mode {
            None | Some(GuestMode::Ping) => NetMode::Ping,
            Some(GuestMode::Echo) => NetMode::Echo,
            Some(GuestMode::Evil) => NetMode::Evil,
            Some(GuestMode::Tx) => NetMode::Tx,
            Some(GuestMode::Rx) => NetMode::Rx,
            Some(m) => {
                return Err(input(format!("--mode {}: netping's modes are ping, echo, evil, tx and rx", m.name())))
            }
        };
        if nics == 0 {
            return Err(input(
                "--builtin netping drives NIC 0: add --net tap=NAME (in the API: a \"net\" entry)".to_string(),
            ));
        }
        let min_mib = netping::MIN_MEM.div_ceil(1 << 20);
        if mem_mib < min_mib {
            return Err(input(format!("--builtin netping needs --mem-mib {min_mib} or more, not {mem_mib}")));
        }
        let cidr = self
            .guest_ip
            .as_deref()
            .ok_or_else(|| input("--builtin netping needs --guest-ip ADDR/PREFIX (like 10.77.0.2/24)".to_string()))?;
        let (addr, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| input(format!("--guest-ip {cidr}: expected ADDR/PREFIX, like 10.77.0.2/24")))?;
        let ip = parse_ip("--guest-ip", addr)?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=30).contains(p))
            .ok_or_else(|| input(format!("--guest-ip {cidr}: the prefix must be a number from 1 to 30")))?;
        check_host_address("--guest-ip", cidr, ip, prefix)?;
        let peer = match (&self.ping, mode) {
            (Some(p), _) => {
                let peer = parse_ip("--ping", p)?;
                check_host_address("--ping", p, peer, prefix)?;
                peer
            }
            (None, NetMode::Ping) => {
                return Err(input("--builtin netping --mode ping needs --ping ADDR (the peer)".to_string()))
            }
            (None, _) => [0; 4],
        };
        if let Some(ms) = self.ping_interval_ms.filter(|&ms| ms > MAX_PING_INTERVAL_MS) {
            return Err(input(format!(
                "--ping-interval-ms {ms}: at most {MAX_PING_INTERVAL_MS} (a minute between pings)"
            )));
        }
        if self.frame_size.is_some() && mode != NetMode::Tx {
            return Err(input(format!("--frame-size is for netping --mode tx, not --mode {}", mode.name())));
        }
        if self.ping_interval_ms.is_some() && mode != NetMode::Ping {
            return Err(input(format!("--ping-interval-ms is for netping --mode ping, not --mode {}", mode.name())));
        }
        let count = self.count.unwrap_or(match mode {
            NetMode::Ping => 5,
            NetMode::Tx => 100_000,
            _ => 0,
        });
        let p = NetParams {
            mode,
            ip,
            prefix,
            peer,
            count,
            frame_size: self.frame_size.unwrap_or(netping::MAX_FRAME),
            interval_ms: self.ping_interval_ms.unwrap_or(0),
        };
        netping::check_params(&p).map_err(|e| input(format!("--builtin netping: {e}")))?;
        Ok((MemfillMode::Fill, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> NetpingArgs {
        NetpingArgs { guest_ip: Some("10.77.0.2/24".into()), ping: Some("10.77.0.1".into()), ..Default::default() }
    }

    fn err(r: Result<(MemfillMode, NetParams), CliError>) -> String {
        match r {
            Err(e) => e.to_string(),
            Ok(p) => panic!("accepted: {p:?}"),
        }
    }

    #[test]
    fn netping_params() {
        let (_, p) = args().params(Some(Builtin::Netping), None, 1, 32).expect("valid");
        assert_eq!((p.mode, p.ip, p.prefix, p.peer, p.count), (NetMode::Ping, [10, 77, 0, 2], 24, [10, 77, 0, 1], 5));
        assert!(err(args().params(Some(Builtin::Netping), None, 0, 32)).contains("add --net tap=NAME"));
        assert!(err(args().params(Some(Builtin::Netping), Some(GuestMode::Verify), 1, 32)).contains("netping's modes"));
        let no_peer = NetpingArgs { ping: None, ..args() };
        assert!(err(no_peer.params(Some(Builtin::Netping), None, 1, 32)).contains("needs --ping"));
        let bad_ip = NetpingArgs { guest_ip: Some("10.77.0/24".into()), ..args() };
        assert!(err(bad_ip.params(Some(Builtin::Netping), None, 1, 32)).contains("--guest-ip 10.77.0"));
        let fs = NetpingArgs { frame_size: Some(64), ..args() };
        assert!(err(fs.params(Some(Builtin::Netping), None, 1, 32)).contains("--frame-size is for netping --mode tx"));
        let (_, tx) = fs.params(Some(Builtin::Netping), Some(GuestMode::Tx), 1, 32).expect("tx");
        assert_eq!((tx.mode, tx.frame_size, tx.count), (NetMode::Tx, 64, 100_000));
        assert!(err(args().params(Some(Builtin::Netping), None, 1, 2)).contains("--mem-mib"));
    }

    #[test]
    fn network_broadcast_and_non_host_addresses_are_refused() {
        for (guest_ip, ping, needle) in [
            (
                "10.77.0.255/24",
                "10.77.0.1",
                "--guest-ip 10.77.0.255/24: 10.77.0.255 is the broadcast address of 10.77.0.0/24",
            ),
            ("10.77.0.0/24", "10.77.0.1", "--guest-ip 10.77.0.0/24: 10.77.0.0 is the network address of 10.77.0.0/24"),
            ("10.77.0.3/30", "10.77.0.1", "10.77.0.3 is the broadcast address of 10.77.0.0/30"),
            ("10.77.0.2/24", "10.77.0.255", "--ping 10.77.0.255: 10.77.0.255 is the broadcast address"),
            ("10.77.0.2/24", "10.77.0.0", "--ping 10.77.0.0: 10.77.0.0 is the network address"),
            ("224.0.0.2/24", "224.0.0.1", "a multicast address"),
            ("127.0.0.2/8", "127.0.0.1", "a loopback address"),
            ("0.0.0.2/24", "0.0.0.1", "this network"),
            ("255.255.255.254/24", "255.255.255.1", "reserved or broadcast"),
        ] {
            let a = NetpingArgs { guest_ip: Some(guest_ip.into()), ping: Some(ping.into()), ..Default::default() };
            let e = err(a.params(Some(Builtin::Netping), None, 1, 32));
            assert!(e.contains(needle), "{guest_ip} {ping}: {e}");
        }
        // The first and last host addresses are fine.
        for (guest_ip, ping) in [("10.77.0.254/24", "10.77.0.1"), ("10.77.0.1/30", "10.77.0.2")] {
            let a = NetpingArgs { guest_ip: Some(guest_ip.into()), ping: Some(ping.into()), ..Default::default() };
            a.params(Some(Builtin::Netping), None, 1, 32).expect(guest_ip);
        }
    }

    #[test]
    fn the_ping_interval_is_bounded() {
        let a = NetpingArgs { ping_interval_ms: Some(u64::MAX), ..args() };
        let e = err(a.params(Some(Builtin::Netping), None, 1, 32));
        assert!(e.contains(&format!("--ping-interval-ms {}: at most 60000", u64::MAX)), "{e}");
        let a = NetpingArgs { ping_interval_ms: Some(MAX_PING_INTERVAL_MS + 1), ..args() };
        assert!(err(a.params(Some(Builtin::Netping), None, 1, 32)).contains("at most 60000"));
        let a = NetpingArgs { ping_interval_ms: Some(MAX_PING_INTERVAL_MS), ..args() };
        a.params(Some(Builtin::Netping), None, 1, 32).expect("a minute");
    }

    #[test]
    fn netping_options_are_refused_elsewhere() {
        assert!(err(args().params(Some(Builtin::Hello), None, 0, 32))
            .contains("--guest-ip is an option of --builtin netping, not of --builtin hello"));
        assert!(err(args().params(None, None, 1, 32)).contains("not of a kernel or firmware VM"));
        let none = NetpingArgs::default();
        assert!(err(none.params(Some(Builtin::Memfill), Some(GuestMode::Ping), 0, 32)).contains("memfill's modes"));
        assert!(err(none.params(Some(Builtin::Touch), Some(GuestMode::Echo), 0, 32)).contains("only --builtin memfill"));
        let (m, _) = none.params(Some(Builtin::Memfill), Some(GuestMode::Verify), 0, 32).expect("memfill verify");
        assert_eq!(m, MemfillMode::Verify);
    }
}
