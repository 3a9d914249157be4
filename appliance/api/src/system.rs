//! The appliance itself, as the local console sees it: the administrator's password, the
//! network, host name, time servers, proxy, registration with the provider, maintenance
//! actions, and the status, diagnostics and support views. The configuration server applies
//! all of it (the console only calls the API), and these types and their checks are shared so
//! that both refuse bad input in the same words.

use crate::validate::{self, Invalid};
use crate::Event;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Shortest administrator password.
pub const PASSWORD_MIN: usize = 8;
/// Longest password: bounds the key-derivation work a request can cause.
pub const PASSWORD_MAX: usize = 256;

/// `GET /v1/system/setup`: what the first-boot wizard still has to do.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SetupStatus {
    pub password_set: bool,
    /// The wizard ran to its end once.
    pub wizard_done: bool,
    pub settings: Settings,
    /// The network configuration last confirmed, if any.
    pub network: Option<NetworkConfig>,
    /// The provider this appliance registered with, if any.
    pub registered_with: Option<String>,
    /// The update slot chosen for the next boot (`a` or `b`), if one was chosen here.
    pub update_slot: Option<String>,
}

/// `PUT /v1/system/password`. `current` is required once a password is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPassword {
    pub password: String,
    #[serde(default)]
    pub current: Option<String>,
}

impl SetPassword {
    pub fn validate(&self) -> Result<(), Invalid> {
        password(&self.password)
    }
}

pub fn password(p: &str) -> Result<(), Invalid> {
    let n = p.chars().count();
    if n < PASSWORD_MIN {
        return Err(Invalid::new(
            "password",
            format!("must be at least {PASSWORD_MIN} characters, not {n}"),
        ));
    }
    if p.len() > PASSWORD_MAX {
        return Err(Invalid::new(
            "password",
            format!("must be at most {PASSWORD_MAX} bytes"),
        ));
    }
    if p.chars().any(char::is_control) {
        return Err(Invalid::new("password", "must not hold control characters"));
    }
    Ok(())
}

/// `POST /v1/system/login`: the console's unlock. Wrong passwords are counted; after a few the
/// server refuses every attempt for a while (`429 locked-out`), and each attempt is audited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub password: String,
}

/// The answer to a successful login.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LoggedIn {
    /// Wrong attempts before this one since the last success.
    pub failed_before: u32,
}

/// How the address of one family is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AddressMode {
    Dhcp,
    Static,
}

/// `PUT /v1/system/network`: one interface's configuration. With `vlan`, the addresses go on
/// the VLAN interface `{interface}.{vlan}`; `mtu` applies to the interface (and its VLAN).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub interface: String,
    pub mode: AddressMode,
    /// Static: `ADDRESS/PREFIX`.
    #[serde(default)]
    pub ipv4: Option<String>,
    #[serde(default)]
    pub gateway4: Option<String>,
    #[serde(default)]
    pub ipv6: Option<String>,
    #[serde(default)]
    pub gateway6: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
    #[serde(default)]
    pub vlan: Option<u16>,
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// An address with its prefix length, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(field: &str, s: &str) -> Result<Cidr, Invalid> {
        let bad = |why: &str| Invalid::new(field, format!("{s:?} {why}"));
        let (a, p) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("is not ADDRESS/PREFIX (e.g. 192.0.2.10/24)"))?;
        let addr: IpAddr = a.parse().map_err(|_| bad("is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (1..=max).contains(p))
            .ok_or_else(|| bad(&format!("needs a prefix length from 1 to {max}")))?;
        let unusable = match addr {
            IpAddr::V4(v) => {
                v.is_unspecified() || v.is_broadcast() || v.is_multicast() || v.is_loopback()
            }
            IpAddr::V6(v) => v.is_unspecified() || v.is_multicast() || v.is_loopback(),
        };
        if unusable {
            return Err(bad("cannot be an interface's address"));
        }
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` lies inside this address's network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// Interface names: what the kernel takes (at most 15 bytes, no `/`, no blanks).
pub fn interface(field: &str, s: &str) -> Result<(), Invalid> {
    if s.is_empty() || s.len() > 15 || s.bytes().any(|b| b == b'/' || b <= b' ' || b >= 127) {
        return Err(Invalid::new(
            field,
            format!("{s:?} is not an interface name (1 to 15 characters, no '/' or blanks)"),
        ));
    }
    Ok(())
}

/// The parsed, checked form of a [`NetworkConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkPlan {
    pub interface: String,
    pub dhcp: bool,
    pub ipv4: Option<(Cidr, Option<Ipv4Addr>)>,
    pub ipv6: Option<(Cidr, Option<Ipv6Addr>)>,
    pub dns: Vec<IpAddr>,
    pub vlan: Option<u16>,
    pub mtu: Option<u32>,
}

impl NetworkPlan {
    /// The interface the addresses go on.
    pub fn target(&self) -> String {
        match self.vlan {
            Some(v) => format!("{}.{v}", self.interface),
            None => self.interface.clone(),
        }
    }
}

pub const MTU_MIN: u32 = 576;
pub const MTU_MAX: u32 = 9216;

/// A field's value, trimmed; none when empty.
fn opt(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl NetworkConfig {
    /// Every field checked and parsed. The gateway must lie inside the address's network (an
    /// off-link gateway cannot be reached); whether it answers is checked after applying.
    pub fn plan(&self) -> Result<NetworkPlan, Invalid> {
        interface("interface", &self.interface)?;
        if let Some(v) = self.vlan {
            validate::range("vlan", v, 1, 4094)?;
            if self.interface.len() + 1 + v.to_string().len() > 15 {
                return Err(Invalid::new(
                    "vlan",
                    format!(
                        "the VLAN interface name {}.{v} would be longer than 15 characters",
                        self.interface
                    ),
                ));
            }
        }
        if let Some(m) = self.mtu {
            validate::range("mtu", m, MTU_MIN, MTU_MAX)?;
        }
        let dhcp = self.mode == AddressMode::Dhcp;
        if dhcp
            && [&self.ipv4, &self.gateway4, &self.ipv6, &self.gateway6]
                .iter()
                .any(|f| opt(f).is_some())
        {
            return Err(Invalid::new(
                "mode",
                "DHCP takes no addresses or gateways; choose static to give them",
            ));
        }
        let ipv4 = match opt(&self.ipv4) {
            Some(s) => {
                let c = Cidr::parse("ipv4", s)?;
                if !c.addr.is_ipv4() {
                    return Err(Invalid::new(
                        "ipv4",
                        format!("{s:?} is not an IPv4 address"),
                    ));
                }
                let gw = match opt(&self.gateway4) {
                    Some(g) => {
                        let ip: Ipv4Addr = g.parse().map_err(|_| {
                            Invalid::new("gateway4", format!("{g:?} is not an IPv4 address"))
                        })?;
                        gateway("gateway4", &c, IpAddr::V4(ip))?;
                        Some(ip)
                    }
                    None => None,
                };
                Some((c, gw))
            }
            None if opt(&self.gateway4).is_some() => {
                return Err(Invalid::new("gateway4", "a gateway needs an IPv4 address"))
            }
            None => None,
        };
        let ipv6 = match opt(&self.ipv6) {
            Some(s) => {
                let c = Cidr::parse("ipv6", s)?;
                if !c.addr.is_ipv6() {
                    return Err(Invalid::new(
                        "ipv6",
                        format!("{s:?} is not an IPv6 address"),
                    ));
                }
                let gw = match opt(&self.gateway6) {
                    Some(g) => {
                        let ip: Ipv6Addr = g.parse().map_err(|_| {
                            Invalid::new("gateway6", format!("{g:?} is not an IPv6 address"))
                        })?;
                        // Link-local gateways are the usual IPv6 case and are always on-link.
                        if ip.segments()[0] & 0xffc0 != 0xfe80 {
                            gateway("gateway6", &c, IpAddr::V6(ip))?;
                        }
                        Some(ip)
                    }
                    None => None,
                };
                Some((c, gw))
            }
            None if opt(&self.gateway6).is_some() => {
                return Err(Invalid::new("gateway6", "a gateway needs an IPv6 address"))
            }
            None => None,
        };
        if !dhcp && ipv4.is_none() && ipv6.is_none() {
            return Err(Invalid::new(
                "ipv4",
                "a static configuration needs an IPv4 or an IPv6 address",
            ));
        }
        if self.dns.len() > 3 {
            return Err(Invalid::new("dns", "at most 3 name servers"));
        }
        let dns = self
            .dns
            .iter()
            .map(|d| {
                d.trim()
                    .parse()
                    .map_err(|_| Invalid::new("dns", format!("{d:?} is not an IP address")))
            })
            .collect::<Result<_, _>>()?;
        Ok(NetworkPlan {
            interface: self.interface.clone(),
            dhcp,
            ipv4,
            ipv6,
            dns,
            vlan: self.vlan,
            mtu: self.mtu,
        })
    }
}

fn gateway(field: &str, net: &Cidr, gw: IpAddr) -> Result<(), Invalid> {
    if gw == net.addr {
        return Err(Invalid::new(
            field,
            format!("{gw} is this appliance's own address"),
        ));
    }
    if !net.contains(gw) {
        return Err(Invalid::new(
            field,
            format!(
                "{gw} is unreachable: it is outside {}/{}",
                net.addr, net.prefix
            ),
        ));
    }
    Ok(())
}

/// `GET /v1/system/network`: the applied configuration and whether it waits for confirmation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkState {
    /// The last confirmed configuration.
    pub confirmed: Option<NetworkConfig>,
    /// A change applied but not yet confirmed; it is rolled back at `deadline_unix`.
    pub pending: Option<PendingNetwork>,
    /// What happened to the last change that was not confirmed, if one was rolled back.
    #[serde(default)]
    pub last_rollback: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PendingNetwork {
    pub id: u64,
    pub config: NetworkConfig,
    pub deadline_unix: u64,
    /// Seconds the administrator has to confirm, counted from the answer.
    pub confirm_secs: u64,
    /// The checks made after applying, in words.
    pub checks: Vec<String>,
}

/// `PUT /v1/system/settings`: the host's name, time servers and HTTP proxy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub ntp: Vec<String>,
    /// `http://[USER:PASSWORD@]HOST:PORT`, or empty for none.
    #[serde(default)]
    pub proxy: String,
}

impl Settings {
    pub fn validate(&self) -> Result<(), Invalid> {
        if !self.hostname.is_empty() {
            validate::name("hostname", &self.hostname)?;
        }
        if self.ntp.len() > 4 {
            return Err(Invalid::new("ntp", "at most 4 time servers"));
        }
        for s in &self.ntp {
            host("ntp", s)?;
        }
        if !self.proxy.is_empty() {
            let rest = self.proxy.strip_prefix("http://").ok_or_else(|| {
                Invalid::new("proxy", "must start with http:// (e.g. http://proxy:3128)")
            })?;
            let hostport = rest.trim_end_matches('/').rsplit('@').next().unwrap_or("");
            let (h, p) = hostport
                .rsplit_once(':')
                .ok_or_else(|| Invalid::new("proxy", "needs a port (http://HOST:PORT)"))?;
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| Invalid::new("proxy", format!("{p:?} is not a port")))?;
            host("proxy", h.trim_start_matches('[').trim_end_matches(']'))?;
            validate::text("proxy", &self.proxy)?;
        }
        Ok(())
    }

    /// The proxy without its credentials, for screens, logs and support bundles.
    pub fn proxy_redacted(&self) -> String {
        redact_url(&self.proxy)
    }
}

/// `http://user:secret@host:3128` → `http://***@host:3128`.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// A host name or an IP address.
pub fn host(field: &str, s: &str) -> Result<(), Invalid> {
    if s.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            field,
            format!("{s:?} is not a host name or IP address"),
        ))
    }
}

/// `POST /v1/system/registration`: enroll this appliance with the provider's configuration
/// server, using the registration key (a one-time enrollment token) the provider issued and the
/// SHA-256 of the provider's CA printed with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// `https://HOST:PORT`.
    pub provider: String,
    pub key: String,
    pub ca_sha256: String,
}

impl Registration {
    pub fn validate(&self) -> Result<(), Invalid> {
        if !self.provider.starts_with("https://") {
            return Err(Invalid::new("provider", "must be https://HOST:PORT"));
        }
        validate::text("provider", &self.provider)?;
        if !self.key.contains('.') || self.key.len() > 200 {
            return Err(Invalid::new(
                "key",
                "is not a registration key (ID.SECRET, as the provider issued it)",
            ));
        }
        let h = self.ca_sha256.trim();
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Invalid::new("ca_sha256", "must be 64 hex digits"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Registered {
    pub provider: String,
    /// The name the provider knows this appliance by.
    pub name: String,
}

/// Maintenance actions; the server runs the command configured for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MaintenanceAction {
    RestartServices,
    Reboot,
    Shutdown,
    /// Needs `confirm: "factory-reset"`.
    FactoryReset,
}

impl MaintenanceAction {
    pub fn as_str(self) -> &'static str {
        match self {
            MaintenanceAction::RestartServices => "restart-services",
            MaintenanceAction::Reboot => "reboot",
            MaintenanceAction::Shutdown => "shutdown",
            MaintenanceAction::FactoryReset => "factory-reset",
        }
    }
}

/// `POST /v1/system/maintenance`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Maintenance {
    pub action: MaintenanceAction,
    #[serde(default)]
    pub confirm: Option<String>,
}

/// `PUT /v1/system/update-slot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSlot {
    /// `a` or `b`.
    pub slot: String,
}

/// What a command run for the appliance said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ActionDone {
    pub action: String,
    pub output: String,
}

/// `GET /v1/system/dashboard`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Dashboard {
    pub hostname: String,
    pub disks: Vec<DiskStatus>,
    pub cache: Option<CacheUse>,
    /// Active alerts, newest last.
    pub alerts: Vec<Event>,
    pub recovery_site: Option<Check>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DiskStatus {
    pub tenant: String,
    pub machine: String,
    pub disk: String,
    pub state: String,
    pub rpo_seconds: Option<f64>,
    pub throughput_bytes_per_sec: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CacheUse {
    pub path: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
}

/// One check's result: what was checked, whether it passed, and the details in words.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Check {
    pub name: String,
    pub target: String,
    pub ok: bool,
    pub detail: String,
}

/// `POST /v1/system/diagnostics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Diagnostics {
    pub checks: Vec<Check>,
}

/// `GET /v1/system/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Logs {
    pub lines: Vec<String>,
}

/// `POST /v1/system/support-bundle`: where the bundle was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SupportBundle {
    pub path: String,
    pub bytes: u64,
    /// How many secrets were removed from it.
    pub redacted: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(ipv4: &str, gw: &str) -> NetworkConfig {
        NetworkConfig {
            interface: "eth0".into(),
            mode: AddressMode::Static,
            ipv4: Some(ipv4.into()),
            gateway4: Some(gw.into()),
            ipv6: None,
            gateway6: None,
            dns: vec![],
            vlan: None,
            mtu: None,
        }
    }

    #[test]
    fn network_plans() {
        let p = net("192.0.2.10/24", "192.0.2.1").plan().unwrap();
        assert_eq!(p.ipv4.unwrap().0.prefix, 24);
        for (a, g, field) in [
            ("192.0.2.300/24", "192.0.2.1", "ipv4"),
            ("192.0.2.10", "192.0.2.1", "ipv4"),
            ("192.0.2.10/33", "192.0.2.1", "ipv4"),
            ("192.0.2.10/24", "198.51.100.1", "gateway4"),
            ("192.0.2.10/24", "192.0.2.10", "gateway4"),
            ("2001:db8::1/64", "192.0.2.1", "ipv4"),
        ] {
            assert_eq!(net(a, g).plan().unwrap_err().field, field, "{a} {g}");
        }
        let mut v = net("192.0.2.10/24", "192.0.2.1");
        v.vlan = Some(4095);
        assert_eq!(v.plan().unwrap_err().field, "vlan");
        v.vlan = Some(100);
        v.mtu = Some(100);
        assert_eq!(v.plan().unwrap_err().field, "mtu");
        v.mtu = Some(1400);
        assert_eq!(v.plan().unwrap().target(), "eth0.100");
        let c = Cidr::parse("x", "2001:db8::5/64").unwrap();
        assert!(c.contains("2001:db8::1".parse().unwrap()));
        assert!(!c.contains("2001:db9::1".parse().unwrap()));
    }

    #[test]
    fn settings_and_redaction() {
        let mut s = Settings {
            hostname: "ferry-01".into(),
            ntp: vec!["pool.ntp.org".into(), "192.0.2.1".into()],
            proxy: "http://u:secret@proxy.example:3128".into(),
        };
        s.validate().unwrap();
        assert_eq!(s.proxy_redacted(), "http://***@proxy.example:3128");
        s.proxy = "proxy:3128".into();
        assert_eq!(s.validate().unwrap_err().field, "proxy");
        s.proxy.clear();
        s.hostname = "Bad_Name".into();
        assert_eq!(s.validate().unwrap_err().field, "hostname");
    }
}
