//! Each screen's form, and how its text becomes an API request. Values are checked by the
//! server (the same rules as every other client, from `ferry_api`); here only what cannot
//! even be put into the request (a VLAN id that is not a number) is refused.

use super::form::Form;
use ferry_api::{AddressMode, NetworkConfig, Settings};

pub fn network_form(cfg: Option<&NetworkConfig>) -> Form {
    let f = Form::new(&[
        ("Interface", "e.g. eth0"),
        ("Mode", "static/dhcp"),
        ("IPv4 address", "a.b.c.d/nn"),
        ("IPv4 gateway", "a.b.c.d"),
        ("IPv6 address", "optional"),
        ("IPv6 gateway", "optional"),
        ("DNS servers", "comma list"),
        ("VLAN id", "1-4094/empty"),
        ("MTU", "576-9216/empty"),
    ])
    .with(1, "static");
    match cfg {
        None => f,
        Some(c) => f
            .with(0, c.interface.clone())
            .with(
                1,
                match c.mode {
                    AddressMode::Dhcp => "dhcp",
                    AddressMode::Static => "static",
                },
            )
            .with(2, c.ipv4.clone().unwrap_or_default())
            .with(3, c.gateway4.clone().unwrap_or_default())
            .with(4, c.ipv6.clone().unwrap_or_default())
            .with(5, c.gateway6.clone().unwrap_or_default())
            .with(6, c.dns.join(","))
            .with(7, c.vlan.map(|v| v.to_string()).unwrap_or_default())
            .with(8, c.mtu.map(|v| v.to_string()).unwrap_or_default()),
    }
}

pub fn host_form(s: &Settings) -> Form {
    Form::new(&[
        ("Host name", "a-z 0-9 -"),
        ("NTP servers", "comma list"),
        ("HTTP proxy", "http://h:port"),
    ])
    .with(0, s.hostname.clone())
    .with(1, s.ntp.join(","))
    .with(2, s.proxy.clone())
}

pub fn register_form() -> Form {
    Form::new(&[
        ("Provider URL", "https://h:p"),
        ("Registration key", "ID.SECRET"),
        ("Provider CA SHA-256", "64 hex"),
    ])
}

pub fn password_form() -> Form {
    Form::new(&[("New password", "8+ chars"), ("Repeat password", "")])
        .secret(0)
        .secret(1)
}

pub fn change_password_form() -> Form {
    Form::new(&[
        ("Current password", ""),
        ("New password", "8+ chars"),
        ("Repeat new", ""),
    ])
    .secret(0)
    .secret(1)
    .secret(2)
}

pub fn login_form() -> Form {
    Form::new(&[("Password", "")]).secret(0)
}

pub fn list(s: &str) -> Vec<String> {
    s.split([',', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// The network form as a request.
pub fn network_config(form: &Form) -> Result<NetworkConfig, String> {
    let num = |i: usize| -> Result<Option<u32>, String> {
        match form.value(i) {
            "" => Ok(None),
            v => v
                .parse()
                .map(Some)
                .map_err(|_| format!("{}: {v:?} is not a number", form.fields[i].label)),
        }
    };
    let mode = match form.value(1) {
        "dhcp" => AddressMode::Dhcp,
        "static" | "" => AddressMode::Static,
        m => return Err(format!("Mode: {m:?} is neither static nor dhcp")),
    };
    let vlan = num(7)?
        .map(|v| u16::try_from(v).map_err(|_| format!("VLAN id: {v} is out of range")))
        .transpose()?;
    Ok(NetworkConfig {
        interface: form.value(0).to_string(),
        mode,
        ipv4: opt(form.value(2)),
        gateway4: opt(form.value(3)),
        ipv6: opt(form.value(4)),
        gateway6: opt(form.value(5)),
        dns: list(form.value(6)),
        vlan,
        mtu: num(8)?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_filled_network_form_is_a_request() {
        let f = super::network_form(None)
            .with(0, "eth0")
            .with(2, "192.0.2.10/24")
            .with(6, "192.0.2.1, 192.0.2.2")
            .with(7, "100");
        let c = super::network_config(&f).unwrap();
        assert_eq!((c.vlan, c.dns.len(), c.mtu), (Some(100), 2, None));
        assert!(super::network_config(&f.with(7, "70000")).is_err());
    }
}
